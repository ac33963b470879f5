"""The CPU filter gradient per device (layers.conv_cpu_filter_grad).

Traced under the trainer's mesh (`sharding.traced_under`), each device sums
its own images (the native kernel's or XLA's chunks) and one psum adds the
devices' sums. Chunking the global
batch instead made XLA's partitioner move every chunk between devices with
collective-permutes, which deadlocked XLA:CPU's in-process collectives on a
2-core host (the FER2013 recipe with 2 CPU devices, exit 134).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from affectjax import sharding
from affectjax.models import layers

DN = ("NHWC", "HWIO", "NHWC")


def _loss(conv, x, w):
  return jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=DN)))


@pytest.mark.parametrize("chunk,native", [(2, False), (3, False), (3, True)])
def test_filter_grad_per_device_equals_lax_without_permutes(chunk, native):
  mesh = sharding.make_mesh()
  devices = mesh.devices.size
  assert devices > 1, "the suite runs with 8 CPU devices (tests/conftest.py)"
  rng = np.random.default_rng(0)
  # 5 images per device: chunks of 2 or 3 leave a remainder chunk.
  x = rng.standard_normal((5 * devices, 7, 6, 3)).astype(np.float32)
  w = (0.3 * rng.standard_normal((3, 3, 3, 4))).astype(np.float32)
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  w = jax.device_put(w, sharding.replicated(mesh))
  ours = functools.partial(layers.conv_cpu_filter_grad,
                           images_per_chunk=chunk, native=native)
  grad = jax.jit(sharding.traced_under(
      mesh, jax.grad(functools.partial(_loss, ours), argnums=(0, 1))))
  reference = jax.jit(jax.grad(
      functools.partial(_loss, jax.lax.conv_general_dilated), argnums=(0, 1)))
  (dx, dw), (dx_ref, dw_ref) = grad(x, w), reference(x, w)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)

  hlo = grad.lower(x, w).compile().as_text()
  assert ("affectjax_conv_filter_grad" in hlo) == native
  assert not re.search(r"collective-permute(-start)?\(", hlo)
  assert len(re.findall(r" all-reduce(-start)?\(", hlo)) >= 1  # The psum.


def test_filter_grad_outside_a_mesh_is_whole_batch_chunks():
  # No mesh in context (tracing outside the trainer): the chunks are the
  # global batch's, as on one device; still equal to lax.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 5, 5, 2)).astype(np.float32)
  w = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
  ours = functools.partial(layers.conv_cpu_filter_grad, images_per_chunk=4,
                           native=False)
  dw = jax.jit(jax.grad(functools.partial(_loss, ours), argnums=1))(x, w)
  dw_ref = jax.grad(functools.partial(_loss, jax.lax.conv_general_dilated),
                    argnums=1)(x, w)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)
