r"""Entry point: flags, optional ``jax.distributed``, then the training run.

  python -m affectjax.main --config=configs/custom_cnn.py:demo --workdir=runs/demo
  python -m affectjax.main --config=configs/vgg16.py --config.batch_size=128 \
      --workdir=runs/vgg16

Every config field can be overridden with ``--config.<field>=<value>``.
Multi-host: pass ``--distributed`` where JAX can discover the cluster (TPU
pods, SLURM, ...), or give ``--coordinator_address``, ``--num_processes`` and
``--process_id`` explicitly (one process per host, or several on one host).
"""
from __future__ import annotations

import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

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

flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Keeps Orbax's and Grain's per-save INFO chatter out of the run log."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/grain/"))


def _init_distributed() -> None:
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and "
                           "--process_id too.")
    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator():
      # CPU processes need a collectives backend to talk to each other.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def _has_accelerator() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _init_distributed()
  logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)",
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from affectjax import train  # pylint: disable=g-import-not-at-top
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(summary.table(result, workdir=_WORKDIR.value), flush=True)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
