r"""Entry point: flags, optional ``jax.distributed``, then the training run.

  python -m affectjax.main --config=configs/custom_cnn.py:demo --workdir=runs/demo
  python -m affectjax.main --config=configs/vgg16.py --config.batch_size=128 \
      --workdir=runs/vgg16

Every config field can be overridden with ``--config.<field>=<value>``.
Multi-host: pass ``--distributed`` where JAX can discover the cluster (TPU
pods, SLURM, ...), or give ``--coordinator_address``, ``--num_processes`` and
``--process_id`` explicitly (one process per host, or several on one host);
``--local_device_ids`` picks this process's GPUs (see affectjax.distributed).

SIGTERM or SIGINT finishes the current step, saves a checkpoint and exits 0
with a line saying how to resume; a second one aborts at once (non-zero).
"""
from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from affectjax import cli
from affectjax import distributed
from affectjax import summary

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: "
    "configs/custom_cnn.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl and config.json. "
    "Rerunning with the same workdir resumes from its latest checkpoint.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster "
    "auto-detection (TPU pods, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for an explicit "
    "multi-process run (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Total processes (explicit setup).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (explicit setup).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated accelerator ids this process "
    "drives, among those it sees (default: JAX_LOCAL_DEVICE_IDS, else an even "
    "share of CUDA_VISIBLE_DEVICES by local rank, else all).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    distributed.initialize(
        auto=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        local_device_ids=_LOCAL_DEVICE_IDS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  distributed.enable_compilation_cache(config.compilation_cache_dir)
  distributed.check_devices()
  from affectjax import train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() != 0:
    return
  if result.get("preempted"):
    print(resume_message(result), flush=True)
  else:
    print(summary.table(result, workdir=_WORKDIR.value), flush=True)


def resume_message(result: dict) -> str:
  """The one line printed when a signal stopped the run after a checkpoint."""
  by = result.get("signal") or "a stop request"
  return (f"Stopped by {by} at step {result['step']} after saving a "
          "checkpoint; rerun the same command to resume.")


def run() -> None:
  app.run(cli.tool(main, "affectjax.main"))


if __name__ == "__main__":
  sys.exit(run())
