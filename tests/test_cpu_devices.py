"""The CPU split into JAX devices (affectjax/cpu_devices.py)."""
import os
import subprocess
import sys

import ml_collections
import pytest

from affectjax import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cores,batch,eval_batch,processes,expected", [
    (2, 64, 512, 1, 2),     # the FER2013 recipe on the 2-core VMs
    (16, 64, 512, 1, 4),    # no device below 16 images of the batch
    (3, 64, 512, 1, 2),     # a count that divides the batch
    (2, 64, 24, 1, 1),      # the eval batch limits it too
    (2, 64, 512, 2, 2),     # per-process batch 32: two devices of 16
    (4, 64, 512, 2, 2),
    (1, 256, 256, 1, 1),
    (8, 17, 17, 1, 1),      # an odd batch: one device
])
def test_auto_count(cores, batch, eval_batch, processes, expected):
  assert cpu_devices.auto_count(cores=cores, batch_size=batch,
                                eval_batch_size=eval_batch,
                                num_processes=processes) == expected


def _devices_in_subprocess(*, cpu_devices_value, xla_flags, extra=""):
  """len(jax.devices()) after configure() in a fresh process (the count is
  fixed once a backend starts, so each case needs its own process)."""
  code = (
      "import jax, ml_collections\n"
      "from affectjax import cpu_devices\n"
      "c = ml_collections.ConfigDict(dict(cpu_devices=%d, batch_size=64, "
      "eval_batch_size=512))\n"
      "%s\n"
      "set_to = cpu_devices.configure(c)\n"
      "print(set_to, len(jax.devices()), cpu_devices.usable_cores())\n"
  ) % (cpu_devices_value, extra)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True)
  set_to, devices, cores = out.stdout.split()
  return (None if set_to == "None" else int(set_to)), int(devices), int(cores)


def test_explicit_count_splits_the_cpu():
  set_to, devices, _ = _devices_in_subprocess(cpu_devices_value=3,
                                              xla_flags="")
  assert (set_to, devices) == (3, 3)


def test_auto_is_one_device_per_usable_core():
  set_to, devices, cores = _devices_in_subprocess(cpu_devices_value=0,
                                                  xla_flags="")
  expected = cpu_devices.auto_count(cores=cores, batch_size=64,
                                    eval_batch_size=512)
  assert devices == expected
  assert set_to == (expected if expected > 1 else None)


def test_the_trainers_default_config_keeps_one_device():
  """The base config's default (cpu_devices=1): no split, one device."""
  code = (
      "import jax\n"
      "from affectjax import config_base, cpu_devices\n"
      "c = config_base.get_base_config()\n"
      "print(c.cpu_devices, cpu_devices.configure(c), len(jax.devices()))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.split() == ["1", "None", "1"]


def test_a_count_the_user_forced_wins():
  set_to, devices, _ = _devices_in_subprocess(
      cpu_devices_value=3,
      xla_flags="--xla_force_host_platform_device_count=5")
  assert (set_to, devices) == (None, 5)


def test_accelerator_backend_is_left_alone():
  # JAX_PLATFORMS naming another backend first: nothing is set (the subprocess
  # then asks for CPU devices explicitly, which stay at JAX's default of 1).
  code = (
      "import jax, ml_collections\n"
      "from affectjax import cpu_devices\n"
      "jax.config.update('jax_platforms', 'tpu,cpu')\n"
      "c = ml_collections.ConfigDict(dict(cpu_devices=4, batch_size=64, "
      "eval_batch_size=512))\n"
      "print(cpu_devices.configure(c), jax.config.jax_num_cpu_devices)\n")
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.split() == ["None", "-1"]


def test_negative_count_is_refused():
  c = ml_collections.ConfigDict(dict(cpu_devices=-2, batch_size=64,
                                     eval_batch_size=64))
  with pytest.raises(ValueError, match="--config.cpu_devices=-2"):
    cpu_devices.configure(c)
