"""How many JAX devices the host CPU is split into for training.

One XLA:CPU device runs a train step as a sequence of ops, each spread over
the cores by an intra-op thread pool; many ops of a small convnet's step
(BatchNorm reductions, pooling, the optimizer update, small convolutions)
keep only one core busy. Splitting the CPU into one JAX device per core and
the batch over them (the trainer's data-parallel mesh, unchanged) runs those
serial stretches side by side: measured on the 2-core VMs, the FER2013
recipe's step went from 207 to 256 images/s (docs/BENCHMARKS.md, "CPU
devices"); four devices on the same two cores were slower (147).

That gain is gone since ``host_malloc`` removed the step's page faults, and
the split costs models with many BatchNorm layers: each layer's statistics
are an all-reduce across the devices (77 a step for EfficientNet-B3), most
likely a rendezvous where one device waits for the other. On the Intel
Xeon VM (docs/BENCHMARKS.md, "CPU devices after host_malloc"):
EfficientNet-B3 (112 px, batch 32) ran at 7.0 images/s on two devices
against 14.5-22.6 on one, with three times the CPU time per image; the
custom CNN's step alone (train_bench) was within 4% either way, but the
FER2013 recipe's real train command, with its host input threads on the
same cores, trained 40-45% faster on one device. So the default is one
device (``config.cpu_devices = 1``); the split stays available.

Semantics are unchanged: the batch is global, BatchNorm's statistics and the
gradients are reduced over every device (the float summation order differs,
as on any other topology), and checkpoints restore onto any device count.

``config.cpu_devices``: 1 (default) = one device, N = exactly N, 0 =
automatic: one device per core this process may run on, but no more than
leave 16 images of the per-process batch (and of the eval batch) per device,
and a count that divides both. It applies only where the
CPU is the default backend, and never overrides a device count the user set
(``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, or
``jax_num_cpu_devices``), which is how the tests keep their 8 devices.
Set it before anything initializes a JAX backend.
"""
from __future__ import annotations

import os

import jax
from absl import logging

# The fewest images a device gets from the automatic choice: below that the
# per-device convolutions get too small to use a core well.
MIN_IMAGES_PER_DEVICE = 16
_FORCE_FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
  """Cores this process may run on (its CPU affinity, e.g. SLURM's cgroup)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def _user_set() -> str | None:
  """What already fixes the CPU device count, or None."""
  if _FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
    return f"{_FORCE_FLAG} in XLA_FLAGS"
  if int(jax.config.jax_num_cpu_devices) > 0:
    return "jax_num_cpu_devices"
  return None


def _cpu_is_default_backend() -> bool:
  platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", ""))
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  # Without an explicit platform list, JAX prefers an accelerator plugin.
  from affectjax import distributed  # pylint: disable=g-import-not-at-top
  return not distributed.has_accelerator_plugin()


def auto_count(*, cores: int, batch_size: int, eval_batch_size: int,
               num_processes: int = 1) -> int:
  """The automatic device count (see the module docstring); at least 1."""
  local_batches = [b // max(num_processes, 1) for b in (batch_size,
                                                        eval_batch_size)]
  for n in range(max(cores, 1), 1, -1):
    if all(b % n == 0 and b // n >= MIN_IMAGES_PER_DEVICE
           for b in local_batches):
      return n
  return 1


def _num_processes() -> int:
  """Processes of this run, known once jax.distributed is initialized (which,
  unlike ``jax.process_count()``, does not start a backend)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return int(jax_distributed.global_state.num_processes or 1)


def configure(config) -> int | None:
  """Sets this process's CPU device count from ``config.cpu_devices``.

  Returns the count it set, or None when it left JAX's default alone (an
  accelerator backend, a count the user set, or a count of 1). Call it after
  ``distributed.initialize`` (the batch is split over every process) and
  before the first ``jax.devices()``, which fixes the count.
  """
  requested = int(config.get("cpu_devices", 1))
  if requested < 0:
    raise ValueError(f"--config.cpu_devices={requested}: use 0 (one device "
                     "per core, automatic) or a positive count.")
  if not _cpu_is_default_backend():
    return None
  reason = _user_set()
  if reason:
    if requested:
      logging.warning("--config.cpu_devices=%d ignored: %s sets the CPU "
                      "device count.", requested, reason)
    return None
  count = requested or auto_count(
      cores=usable_cores(), batch_size=int(config.batch_size),
      eval_batch_size=int(config.eval_batch_size),
      num_processes=_num_processes())
  if count <= 1:
    return None
  jax.config.update("jax_num_cpu_devices", count)
  logging.info("CPU split into %d JAX devices (--config.cpu_devices=%s; "
               "%d usable cores).", count, requested or "0 = automatic",
               usable_cores())
  return count
