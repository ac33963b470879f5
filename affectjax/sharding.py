"""Device mesh and shardings for data-parallel training.

affectjax trains data-parallel over a 1-D ``("data",)`` mesh of every device
of every host: the batch is split along its first axis, the train state is
replicated. Hosts feed only their local slice of each global batch
(``make_array_from_process_local_data``), so the same code serves one CPU, one
8-GPU host, or many TPU hosts under ``jax.distributed``.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: all global devices).

  The axis type is Auto on purpose: `jax.make_mesh` now defaults to Explicit
  axes, which would make sharding part of every array's type; a data-parallel
  step needs none of that.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def traced_under(mesh: Mesh, fn):
  """``fn``, traced with ``mesh`` as the abstract mesh in context.

  Layers that work per device find the mesh through
  ``jax.sharding.get_abstract_mesh()`` (the convolutions' filter gradient,
  affectjax/models/filter_grad.py, sums each device's images inside
  ``jax.shard_map``). Only tracing sees it: the arguments' shardings are the
  caller's, as without it.
  """
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  # jit names the computation (profiles, the compilation cache's log) after
  # the function; a partial's is its function's, as jit alone would use.
  traced.__name__ = traced.__qualname__ = getattr(
      fn, "__name__", getattr(getattr(fn, "func", None), "__name__", "traced"))
  return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh, *, flag: str) -> int:
  """Per-process batch size; fails loudly when the batch doesn't divide.

  Args:
    global_batch_size: batch size summed over all devices of all hosts.
    mesh: the training mesh.
    flag: the config field the size came from, named in the error message.
  """
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"{flag}={global_batch_size} must be a positive multiple of the number "
        f"of devices ({num_devices}); set --{flag} to e.g. "
        f"{max(1, round(global_batch_size / num_devices)) * num_devices}.")
  return global_batch_size // jax.process_count()


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Turns this process's slice of a global batch into global jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}
