"""Process setup shared by every entry point: jax.distributed, devices, compile cache.

``main`` (training) calls, in this order, before any other JAX call::

  distributed.initialize(auto=..., coordinator_address=..., num_processes=...,
                         process_id=..., local_device_ids=...)
  distributed.enable_compilation_cache(config.compilation_cache_dir)
  distributed.check_devices()

The evaluate tool calls ``initialize(auto=--distributed)`` and
``check_devices()`` (multi-host evaluation). predict and export run as one
process on the local devices and call neither.

GPU selection. JAX's cluster auto-detection (SLURM, Open MPI) assumes that
every process on a node sees all of the node's GPUs and drives GPU number
``local rank``. That breaks both common SLURM setups: with ``--gpus-per-task=1``
each process sees one GPU (``CUDA_VISIBLE_DEVICES`` holds one id) and JAX picks
device ``SLURM_LOCALID`` of one, an invalid ordinal; with one process per node
it drives only GPU 0 (jax-ml/jax#16788). ``resolve_local_device_ids`` picks
the devices from what the process can actually see instead;
``--local_device_ids`` or ``JAX_LOCAL_DEVICE_IDS`` override it.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence

import jax
from absl import logging

from affectjax import early_signals


def parse_device_ids(value: str | Sequence[int] | None, *,
                     flag: str = "--local_device_ids") -> list[int] | None:
  """'0,1,3' -> [0, 1, 3]; '' or None -> None; a clear error otherwise."""
  if value is None:
    return None
  if not isinstance(value, str):
    return [int(v) for v in value]
  value = value.strip()
  if not value:
    return None
  try:
    ids = [int(v) for v in value.split(",")]
  except ValueError:
    raise ValueError(f"{flag}={value!r}: give comma-separated device "
                     "numbers, e.g. 0,1.") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f"{flag}={value!r}: device numbers must be distinct "
                     "and >= 0.")
  return ids


def _tasks_on_this_node(environ: Mapping[str, str]) -> tuple[int, int] | None:
  """(processes on this node, this process's rank among them), if a launcher says."""
  if "SLURM_LOCALID" in environ:
    per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get(
        "SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    # '8', '8(x2)' (uniform) count; '2(x3),1' (uneven) does not.
    m = re.fullmatch(r"(\d+)(\(x\d+\))?", per_node or "")
    if m is None:
      return None
    return int(m.group(1)), int(environ["SLURM_LOCALID"])
  if "OMPI_COMM_WORLD_LOCAL_SIZE" in environ:
    return (int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"]),
            int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
  return None


def resolve_local_device_ids(flag_value: str | Sequence[int] | None = None,
                             environ: Mapping[str, str] | None = None
                             ) -> list[int] | None:
  """The accelerator ids this process drives; None = JAX's default (all it sees).

  In order: ``--local_device_ids``; ``JAX_LOCAL_DEVICE_IDS``; else, where a
  launcher restricted the process with ``CUDA_VISIBLE_DEVICES`` (or ROCm's
  ``ROCR_VISIBLE_DEVICES``), an even share of the devices it sees: one
  visible device -> [0] (SLURM ``--gpus-per-task=1``); one process on the node
  -> all of them; k processes sharing n visible devices -> n/k each, by local
  rank. The ids index the devices visible to the process, not the node's.
  """
  environ = os.environ if environ is None else environ
  if (ids := parse_device_ids(flag_value)) is not None:
    return ids
  if (ids := parse_device_ids(environ.get("JAX_LOCAL_DEVICE_IDS"),
                              flag="JAX_LOCAL_DEVICE_IDS")) is not None:
    return ids
  visible = (environ.get("CUDA_VISIBLE_DEVICES")
             or environ.get("ROCR_VISIBLE_DEVICES") or "").strip()
  if not visible or visible in ("-1", "NoDevFiles"):
    return None
  n = len(visible.split(","))
  if n == 1:
    return [0]
  tasks = _tasks_on_this_node(environ)
  if tasks is None:
    return None  # No launcher: JAX uses every visible device.
  k, rank = tasks
  if k <= 1:
    return list(range(n))
  if n % k:
    raise ValueError(
        f"{k} processes on this node share {n} visible devices "
        f"(CUDA_VISIBLE_DEVICES={visible}), which does not split evenly. Give "
        "each process its devices with --local_device_ids (or "
        "JAX_LOCAL_DEVICE_IDS), or launch one process per GPU (SLURM: "
        "--ntasks-per-node=<gpus> --gpus-per-task=1).")
  per = n // k
  return list(range(rank * per, (rank + 1) * per))


def _count(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name) or 0)
  except ValueError:
    return 0


def launched_tasks(environ: Mapping[str, str] | None = None
                   ) -> tuple[int, str] | None:
  """Whether a launcher started this process as one task of several.

  Returns (the number of tasks, or 2 where only "more than one" is known;
  the variable that says so), or None. The launchers are those
  ``jax.distributed.initialize`` detects (jax/_src/clusters) and the MPI
  ones beside them:

  - SLURM ``srun``: ``SLURM_STEP_NUM_TASKS`` (the step's tasks; a batch
    script itself is no step and has only the job's ``SLURM_NTASKS``, where
    one process is right), else ``SLURM_NTASKS`` where JAX's SLURM detection
    sees a step (``SLURM_STEP_NODELIST``);
  - Open MPI ``mpirun`` (``OMPI_COMM_WORLD_SIZE``), MPICH/Intel MPI/Cray PMI
    (``PMI_SIZE``), MVAPICH (``MV2_COMM_WORLD_SIZE``), a PMIx launcher
    (``PMIX_RANK`` above 0: the size is not in the environment);
  - a Kubernetes indexed Job (``JOB_COMPLETION_INDEX`` above 0);
  - Cloud TPU hosts of a pod slice (``TPU_WORKER_HOSTNAMES`` or
    ``TPU_PROCESS_ADDRESSES`` with several hosts, ``MEGASCALE_NUM_SLICES``).
  """
  environ = os.environ if environ is None else environ
  for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
               "MV2_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES"):
    if (n := _count(environ, name)) > 1:
      return n, f"{name}={n}"
  if ("SLURM_STEP_NUM_TASKS" not in environ and "SLURM_STEP_NODELIST" in environ
      and (n := _count(environ, "SLURM_NTASKS")) > 1):
    return n, f"SLURM_NTASKS={n}"
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    hosts = [h for h in (environ.get(name) or "").split(",") if h.strip()]
    if len(hosts) > 1:
      return len(hosts), f"{name} lists {len(hosts)} hosts"
  for name in ("PMIX_RANK", "JOB_COMPLETION_INDEX"):
    if (rank := _count(environ, name)) > 0:
      return 2, f"{name}={rank}"
  return None


def check_launch(*, joined: bool, independent: bool,
                 environ: Mapping[str, str] | None = None) -> None:
  """Refuses (``ValueError``, exit 2 in ``main``) a process that a launcher
  started as one of several tasks without joining them into one run.

  ``joined``: --distributed or --coordinator_address. ``independent``: the
  user asked for independent runs (--nodistributed given explicitly). A
  user who forgot --distributed under ``srun -n 2`` would otherwise get two
  separate runs racing in one workdir; joining them silently would turn a
  deliberate sweep (``srun --multi-prog``, one config per task) into one
  run. So the trainer asks, at once, in one line.
  """
  if joined or independent:
    return
  tasks = launched_tasks(environ)
  if tasks is None:
    return
  n, why = tasks
  count = f"{n} tasks" if not why.startswith(("PMIX", "JOB_COMPLETION")) else (
      "several tasks")
  raise ValueError(
      f"this process is one of {count} a launcher started ({why}), but "
      "--distributed is not given: each task would train on its own, all in "
      "one workdir. Add --distributed to train one run across the tasks, or "
      "pass --nodistributed to train independent runs (each with its own "
      "--workdir).")


def has_accelerator_plugin() -> bool:
  """Whether a GPU or TPU plugin of jax is installed (JAX would prefer it)."""
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def initialize(*, auto: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: str | Sequence[int] | None = None) -> None:
  """Sets up this process; call before any other JAX call.

  ``coordinator_address`` (with ``num_processes`` and ``process_id``): an
  explicit multi-process run. ``auto``: ``jax.distributed.initialize()`` with
  cluster auto-detection (TPU pods, SLURM, Open MPI). Neither: one process.
  ``jax.distributed`` replaces the SIGTERM handler with XLA's notifier,
  which would swallow the signal; it is put back
  (``early_signals.reclaim_sigterm``): the early handler of
  ``early_signals.catch_signals_early`` if the process installed one (the
  trainer: a SIGTERM during start-up stops the run before its first step),
  else the default (SIGTERM ends the process).
  """
  ids = resolve_local_device_ids(local_device_ids)
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and "
                       "--process_id too.")
    if (jax.config.jax_platforms in (None, "", "cpu")
        and not has_accelerator_plugin()):
      # CPU processes need a collectives backend to talk to each other.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=ids)
  elif auto:
    jax.distributed.initialize(local_device_ids=ids)
  elif ids is not None:
    # One process: select its GPUs the way jax.distributed would.
    visible = ",".join(map(str, ids))
    jax.config.update("jax_cuda_visible_devices", visible)
    jax.config.update("jax_rocm_visible_devices", visible)
  if jax.distributed.is_initialized():
    # jax.distributed's preemption notifier swallows SIGTERM (see
    # affectjax.preemption); ours comes back until StopRequest takes over.
    early_signals.reclaim_sigterm()
  _selected_ids.clear()
  _selected_ids.extend(ids or [])


_selected_ids: list[int] = []


def check_devices() -> dict:
  """Logs the process/device layout; fails if processes differ in devices.

  Every process sees the same global device list, so all of them fail
  together with the same message. Returns the numbers it logged.
  """
  devices = jax.devices()
  per_process = collections.Counter(d.process_index for d in devices)
  platforms = sorted({d.platform for d in devices})
  info = {"process_index": jax.process_index(),
          "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(),
          "global_devices": len(devices), "platform": ",".join(platforms)}
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)%s",
               jax.__version__, info["process_index"], info["process_count"],
               info["local_devices"], info["global_devices"], info["platform"],
               f", local device ids {_selected_ids}" if _selected_ids else "")
  if len(set(per_process.values())) > 1 or len(platforms) > 1:
    layout = ", ".join(f"process {p}: {n}" for p, n in sorted(per_process.items()))
    raise RuntimeError(
        f"Processes see different numbers of devices ({layout}; platforms "
        f"{platforms}). Every process must drive the same number: one process "
        "per GPU (SLURM --ntasks-per-node=<gpus> --gpus-per-task=1) or one "
        "per host, or pick devices with --local_device_ids / "
        "JAX_LOCAL_DEVICE_IDS."
        + (" A process on 'cpu' among GPU peers has a CPU-only jax: reinstall "
           "with ./launch.sh (it installs the CUDA build)."
           if len(platforms) > 1 else ""))
  return info


def enable_compilation_cache(path: str) -> str | None:
  """Turns on JAX's persistent compilation cache in ``path`` ('' = off).

  Reruns and resumes then skip XLA compilation of unchanged steps. ``~`` is
  expanded; a URL (gs://...) is passed to JAX as is. Returns the directory
  used, or None when off. Call before the first compilation.
  """
  if not path:
    return None
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("JAX compilation cache: %s", path)
  return path
