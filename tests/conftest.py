"""Test-wide environment: 8 fake CPU devices for sharding tests, Keras on JAX.

These must be set before jax (or keras) is first imported, which is why they
live at module top level of the root conftest rather than in a fixture.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
