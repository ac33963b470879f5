r"""Entry point: flags, optional ``jax.distributed``, then the training run.

  python -m affectjax.main --config=configs/custom_cnn.py:demo --workdir=runs/demo
  python -m affectjax.main --config=configs/vgg16.py --config.batch_size=128 \
      --workdir=runs/vgg16

Every config field can be overridden with ``--config.<field>=<value>``.
Multi-host: pass ``--distributed`` where JAX can discover the cluster (TPU
pods, SLURM, ...), or give ``--coordinator_address``, ``--num_processes`` and
``--process_id`` explicitly (one process per host, or several on one host);
``--local_device_ids`` picks this process's GPUs (see affectjax.distributed).

Exit status, for schedulers and retry wrappers:
  0   the run finished (``total_steps`` reached, or early stopping);
  75  (EX_TEMPFAIL, ``--preempted_exit_code``) SIGTERM or SIGINT stopped it
      after the current step and a synchronous checkpoint, or before the
      first step (a signal during start-up: nothing new to save): rerun the
      same command to resume;
  128 + N  a second signal N (a second SIGINT; a SIGTERM 2 s or more after
      the first, never under SLURM: see affectjax.signal_rules), or no step
      finished within 5 minutes of the first (aborted without saving; the
      last checkpoint is kept);
  2   the command must change: a config or flag that cannot work
      (``ConfigError``, a bad flag value), a path named by a flag that does
      not exist, a workdir another live run holds (``run_lock``), or one of
      several tasks a launcher started without ``--distributed`` (one line
      naming it, no traceback; see ``affectjax.cli``); all checked at start;
  1   any other failure: an I/O error (a checkpoint save onto a full or
      read-only disk, a storage timeout; a save failure is one line, its
      traceback in the log at ``--verbosity=0``), a data file that vanished
      or a damaged record once training has started, or a bug (with its
      traceback). A crash never exits with the preemption status, so a
      requeue-on-75 rule never retries a broken run forever.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
  # Before anything slow (importing JAX takes seconds): a scheduler's
  # SIGTERM during start-up stops the run cleanly (see affectjax.early_signals).
  from affectjax import early_signals as _early_signals
  _early_signals.catch_signals_early()

import jax
from absl import app, flags
from ml_collections import config_flags

from affectjax import cli
from affectjax import cpu_devices
from affectjax import distributed
from affectjax import early_signals
from affectjax import preemption
from affectjax import run_lock
from affectjax import summary

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: "
    "configs/custom_cnn.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl and config.json. "
    "Rerunning with the same workdir resumes from its latest checkpoint.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster "
    "auto-detection (TPU pods, SLURM, Open MPI). Required when a launcher "
    "starts several tasks (srun -n 2, mpirun -np 2): without it they are "
    "refused at start; --nodistributed trains them as independent runs.")
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

_PREEMPTED_EXIT_CODE = flags.DEFINE_integer(
    "preempted_exit_code", 75, "Exit status after a signal stopped the run "
    "and its checkpoint was saved (75 = EX_TEMPFAIL, 'try again'), so that "
    "schedulers requeue it (SLURM --requeue, a Kubernetes podFailurePolicy "
    "on exit code 75) instead of counting it as done. 0, or 3-125: 1 and 2 "
    "are failures and usage errors, 126 and up the shell's and signals'.")

flags.mark_flags_as_required(["config", "workdir"])

# A failure's exit status (see the module docstring).
_EXIT_FAILURE = cli.FAILURE


def main(argv) -> int:
  """Runs the training; returns the exit status (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  preempted_code = _PREEMPTED_EXIT_CODE.value
  if preempted_code != 0 and not 3 <= preempted_code <= 125:
    raise app.UsageError(
        f"--preempted_exit_code={preempted_code}: use 0 or 3-125 (1 and 2 "
        "are failures and usage errors, 126 and up the shell's and "
        "signals').")
  config = _config()
  try:
    distributed.check_launch(
        joined=_DISTRIBUTED.value or bool(_COORDINATOR.value),
        independent=_DISTRIBUTED.present and not _DISTRIBUTED.value)
    distributed.initialize(
        auto=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        local_device_ids=_LOCAL_DEVICE_IDS.value)
    cpu_devices.configure(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  distributed.enable_compilation_cache(config.compilation_cache_dir)
  distributed.check_devices()
  lock = _lock_workdir(_WORKDIR.value)
  try:
    result = _train(config, _WORKDIR.value)
  except early_signals.StoppedBeforeStart as e:
    result = {"preempted": True, "step": None, "signal": e.signal_name}
  except Exception as e:  # pylint: disable=broad-except
    if preemption.loop_entered() and _is_damage(e):
      cli.mark_failure(e)
    raise
  finally:
    if lock is not None:
      lock.release()
  if jax.process_index() == 0:
    if result.get("preempted"):
      print(resume_message(result, preempted_code), flush=True)
    else:
      print(summary.table(result, workdir=_WORKDIR.value), flush=True)
  if result.get("preempted"):
    raise Preempted(preempted_code)  # Every process: each one is requeued.
  return 0


def _config():
  """``--config``'s value; a file that cannot be loaded is a usage error.

  ml_collections reports a config file it could not read (a wrong path) only
  at the config's first use, as an ``OSError`` of several lines; here it is
  one line naming the flag (exit 2).
  """
  config = _CONFIG.value
  try:
    config.get("total_steps")
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise app.UsageError(
        f"--config: cannot load the config file ({reason}).") from None
  return config


_LOCK_KEY = "affectjax/run_lock"
_LOCK_WAIT_S = 600


def _is_damage(error: BaseException) -> bool:
  """A file missing or a record damaged. Before the training loop they are
  the command's inputs (exit 2: a --config.data.dir without its shards, say);
  once it has started (``preemption.loop_entered``) they are files that
  vanished or were damaged during the run: exit 1, with the traceback."""
  if isinstance(error, cli.MISSING_PATH):
    return True
  from affectjax import data  # pylint: disable=g-import-not-at-top
  return isinstance(error, data.RecordError)


def _lock_workdir(workdir: str) -> run_lock.RunLock | None:
  """Process 0 takes the workdir's lock (``run_lock``); every process raises
  the same usage error if another run holds it."""
  from affectjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  path = str(workdir_lib.path(workdir))
  lock, refused = None, ""
  if jax.process_index() == 0:
    try:
      lock = run_lock.acquire(path)
    except run_lock.WorkdirBusyError as e:
      refused = str(e)
  if jax.process_count() > 1:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    client = jax_distributed.global_state.client
    if jax.process_index() == 0:
      client.key_value_set(_LOCK_KEY, refused or "ok")
    else:
      answer = client.blocking_key_value_get(_LOCK_KEY, _LOCK_WAIT_S * 1000)
      refused = "" if answer == "ok" else answer
  if refused:
    raise app.UsageError(refused)
  return lock


def _train(config, workdir) -> dict:
  """``train.train_and_evaluate``, unless a signal came during start-up.

  A signal so far stops the run here (``StoppedBeforeStart``), before the
  model is built; a later one during start-up is the run's ``StopRequest``'s,
  which raises the same. A ``ConfigError`` (refused before training) is
  reported by ``cli.tool``: one line, exit 2.
  """
  early_signals.stop_if_signalled_during_start_up()
  from affectjax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)


class Preempted(SystemExit):
  """The exit of a run a signal stopped after its checkpoint was saved.

  Its own type, so ``run`` tells it apart from a failure that happens to
  raise ``SystemExit`` with the same status.
  """


def resume_message(result: dict, exit_code: int = 75) -> str:
  """The line printed when a signal stopped the run (step None: before its
  first step, during start-up)."""
  by = result.get("signal") or "a stop request"
  if result.get("step") is None:
    return (f"Stopped by {by} before the first step (nothing new to save); "
            f"rerun the same command to resume (exit status {exit_code}).")
  return (f"Stopped by {by} at step {result['step']} after saving a "
          "checkpoint; rerun the same command to resume (exit status "
          f"{exit_code}).")


def run() -> None:
  """``app.run(main)``; only a checkpointed stop exits with the preemption status.

  A failure whose ``SystemExit`` carries that status (a library calling
  ``sys.exit(75)``) exits 1 instead, or a requeue-on-75 rule would retry a
  broken run forever. A bad or missing flag exits 2 (``cli.parse_flags``).
  SIGTERM and SIGINT are caught from here on (``python -m affectjax.main``
  catches them earlier still, before importing JAX).
  """
  early_signals.catch_signals_early()
  try:
    app.run(cli.tool(main, "affectjax.main"), flags_parser=cli.parse_flags)
  except Preempted:
    raise
  except SystemExit as e:
    code = _PREEMPTED_EXIT_CODE.value if flags.FLAGS.is_parsed() else 75
    if code and e.code == code:
      sys.stderr.write(
          f"affectjax.main: exit status {code} from a failure, not from a "
          f"stop request; exiting {_EXIT_FAILURE} instead.\n")
      raise SystemExit(_EXIT_FAILURE) from None
    raise


if __name__ == "__main__":
  run()
