"""One Orbax manager for the train state and the global data position.

A checkpoint step directory holds two items (plus Orbax's own ``metrics``):
  * ``state``: the train-state pytree (params, BatchNorm statistics, optimizer
    state, step, EMA weights if any), saved asynchronously;
  * ``position``: the data position, once for the whole job (process 0 writes
    it): the train iterator's state, ``{"next_index": k}`` = the next global
    batch, and the global batch size it counts in.

Elastic resume. The train state is replicated and restored onto the current
run's abstract state (its mesh's shardings), and the data position is
global: every process of any topology reads rows of global batch k of one
seeded order. So a job saved by P processes x D devices resumes on any
Q x E whose devices divide the batch, and continues exactly as an
uninterrupted run. The global batch size must match (``--config.batch_size``):
a run with another one refuses to resume (``IncompatibleCheckpointError``).
Checkpoints written before the position item existed hold a ``data`` item
with one Grain file per process (``process_i-of-n.json``); they are still
read (process 0's file, after checking that all of them agree).

Which steps stay on disk is Orbax's preservation policy: the latest ``keep``
steps, and (when ``best_metric`` is set) also the best step by that metric
among those saved with ``metrics=``. Ties between equal metric values go to
the later step, in Orbax's ``BestN`` and in ``best_step()`` alike, so the step
``best.json`` names (beside the step directories, for people and scripts)
is always one Orbax keeps.

Faults. Orbax commits a step atomically: on a local or shared filesystem it
writes the step under a temporary name and renames it when complete; on
gs:// (no directory renames) it writes the step in place and marks it
complete last (``commit_success.txt``), and a step without the mark is not
listed. So a run killed mid-save, or a save that fails (a full disk, a
read-only workdir, a storage timeout), leaves the previous checkpoints
intact; a save that fails on storage raises ``CheckpointWriteError`` naming
the directory and the cause (exit 1; Orbax's own tracebacks of it go to the
log at INFO). On resume, ``restore_latest`` tells bad bytes from a bad
moment: a step whose files are truncated or corrupt (``bytes_are_bad``) is
skipped with a warning naming it, moved aside as ``<step>.corrupt`` (never
deleted) and the newest readable one restored; any other error (a storage
timeout, an out-of-memory device, a changed model config) fails the run and
leaves every step where it is. A file missing inside a step that is there is
damage; a checkpoint or step directory that is not there (a file system not
mounted, a bucket prefix gone), or a missing file that is back by the time
it is looked for, is not (``Checkpointer._absent``): the storage is at
fault. With several processes, each reads on its own (no Orbax barrier)
and all of them then agree on the outcome.

The directory is any ``etils.epath`` path (local, ``gs://...``); nothing here
uses ``os.path`` or ``open()`` on it.

What an error means (bad bytes or a failed storage; the exceptions) is
decided in ``affectjax.checkpoint_errors``, and Orbax's own reports of a
failed save are routed to the log by ``affectjax.orbax_logging``; this
module acts on them.
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from affectjax import fileio
from affectjax import orbax_internals
from affectjax import orbax_logging
# The exceptions and bytes_are_bad are part of this module's interface.
from affectjax.checkpoint_errors import CheckpointReadError
from affectjax.checkpoint_errors import CheckpointWriteError
from affectjax.checkpoint_errors import IncompatibleCheckpointError
from affectjax.checkpoint_errors import UnreadableCheckpointError
from affectjax.checkpoint_errors import bytes_are_bad
from affectjax.checkpoint_errors import first_line
from affectjax.checkpoint_errors import not_found_path
from affectjax.checkpoint_errors import root_cause
from affectjax.checkpoint_errors import storage_failure
from affectjax.checkpoint_errors import unreachable

BEST_RECORD = "best.json"
POSITION = "position"
_LEGACY_DATA = "data"  # Grain's per-process iterator files (older runs).
_MODES = ("max", "min")


def _as_path(directory) -> epath.Path:
  """A local path is made absolute (so Orbax and people see the same place)."""
  path = epath.Path(directory).expanduser()
  if not str(path).startswith(("gs://", "s3://", "az://", "hf://")):
    path = path.resolve()
  return path


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
  """The JSON-ready numbers of an evaluation record (lists, text, flags dropped).

  Orbax stores metrics as strict JSON: NaN/inf become None
  (``fileio.to_json_compatible``), which ranks last (``_MetricKey``).
  """
  out = {}
  for key, value in fileio.to_json_compatible(dict(metrics)).items():
    if value is None or (isinstance(value, (int, float))
                         and not isinstance(value, bool)):
      out[key] = value
  return out


class _MetricKey:
  """Picklable ``best_fn``: the metric's value, the worst possible if missing.

  A NaN (stored as null) metric, e.g. CCC of a constant prediction, ranks
  below every real value, so it never becomes "best".
  """

  def __init__(self, name: str, mode: str):
    self.name, self.mode = name, mode

  def __call__(self, metrics: Mapping[str, Any]) -> float:
    value = metrics.get(self.name) if metrics else None
    if value is None or not math.isfinite(float(value)):
      return -math.inf if self.mode == "max" else math.inf
    return float(value)


# A process's outcome of reading a step, for the agreement.
_READ, _BAD_BYTES, _FAILED = 0, 1, 2


def _gather(value: int) -> list[int]:
  """``value`` from every process, in process order (a collective when
  several)."""
  if jax.process_count() == 1:
    return [value]
  return [int(v) for v in np.asarray(
      multihost_utils.process_allgather(np.int32(value))).reshape(-1)]


class Checkpointer:
  """Saves every ``every_steps`` (and on demand); keeps the latest ``keep``
  and, with ``best_metric``, the best step by that metric.

  Args:
    directory: where step directories go (any epath path).
    every_steps: save period for ``should_save``.
    keep: the number of latest steps kept.
    best_metric: metric name (e.g. ``macro_f1``) ranking the steps saved with
      ``metrics=``; None keeps only the latest ``keep``.
    best_mode: ``max`` or ``min``: which end of ``best_metric`` is best.
    async_save: write the state in a background thread.
    global_batch_size: the run's global batch (``config.batch_size``),
      recorded with the data position; a restore with a data iterator
      refuses a checkpoint saved with another one. None: not recorded or
      checked (tools that only read the state).
  """

  def __init__(self, directory, *, every_steps: int, keep: int,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True, global_batch_size: int | None = None):
    if best_mode not in _MODES:
      raise ValueError(f"--config.checkpoint.best_mode={best_mode!r}: use "
                       "'max' or 'min'.")
    if keep < 1:
      raise ValueError(f"--config.keep_checkpoints={keep} must be >= 1.")
    self.directory = _as_path(directory)
    self.every_steps = every_steps
    self.best_metric = best_metric or None
    self.best_mode = best_mode
    self.global_batch_size = (None if global_batch_size is None
                              else int(global_batch_size))
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if self.best_metric:
      best_fn = _MetricKey(self.best_metric, best_mode)
      # BestN sorts the steps (in step order) by best_fn with a stable sort
      # and keeps the last n: of equal values, the later step. best_step()
      # breaks ties the same way.
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self._step_format = ocp.step.standard_name_format()
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save,
        best_fn=best_fn, best_mode=best_mode,
        step_name_format=self._step_format,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(
            policies=policies))
    orbax_logging.library_noise_at_info()
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", POSITION))
    self._reader_manager: ocp.CheckpointManager | None = None
    # step -> saved metrics (None: saved without). Orbax reads metrics from
    # committed step directories only; this also covers an async save that
    # is still being written.
    self._metrics: dict[int, dict | None] = {}
    self._pending: int | None = None  # The step an async save is writing.
    self._operations: list[str | None] = []  # Orbax's ids of the last saves.
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The best step saved with metrics; None if no step has metrics.

    Of steps with equal values, the later one, as Orbax's ``BestN`` keeps.
    (Orbax's own ``best_step`` falls back to the latest step, which would
    silently pass a checkpoint off as "best".)
    """
    if not self.best_metric:
      return None
    ranked = [(self.metrics(s), s) for s in self._manager.all_steps()]
    ranked = [(m, s) for m, s in ranked if m is not None]
    if not ranked:
      return None
    key = _MetricKey(self.best_metric, self.best_mode)
    sign = 1.0 if self.best_mode == "max" else -1.0
    return max(ranked, key=lambda ms: (sign * key(ms[0]), ms[1]))[1]

  def metrics(self, step: int) -> dict | None:
    """The metrics a step was saved with (None if saved without)."""
    if step not in self._metrics:
      self._metrics[step] = self._manager.metrics(step)
    return self._metrics[step]

  def should_save(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every_steps > 0
                                   and step % self.every_steps == 0)

  def save(self, step: int, state: Any, data_iterator=None, *,
           metrics: Mapping[str, Any] | None = None,
           wait: bool = False) -> None:
    """Saves ``state`` (and the global data position) at ``step``.

    Args:
      step: the train step.
      state: the train-state pytree.
      data_iterator: the train iterator (its ``get_state()`` is the global
        data position, the same on every process), saved with the state.
      metrics: the selection split's evaluation at this step, when the save
        coincides with one; ranks the step for best-keeping. Must contain
        ``best_metric``.
      wait: block until the checkpoint is committed (the preemption handler
        needs the checkpoint on disk before the process exits).

    Raises:
      CheckpointWriteError: this save, or the asynchronous one before it,
        failed; the steps committed before it are intact.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[POSITION] = ocp.args.JsonSave({
          "iterator": data_iterator.get_state(),
          "global_batch_size": self.global_batch_size,
          # For people reading it; a resume may use any topology.
          "process_count": jax.process_count(),
          "device_count": jax.device_count()})
    saved_metrics = None
    if metrics is not None:
      saved_metrics = scalar_metrics(metrics)
      if self.best_metric and self.best_metric not in saved_metrics:
        raise KeyError(
            f"--config.checkpoint.best_metric={self.best_metric!r} is not an "
            f"evaluation metric; choose one of {sorted(saved_metrics)}.")
    with self._writing(step):
      with orbax_logging.without_untracked_save_warning():
        self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                           metrics=saved_metrics if self.best_metric else None)
      self._pending = step
      # Those of the last saves are enough: one may still be in flight.
      self._operations = [*self._operations[-1:],
                          orbax_internals.current_operation_id()]
      self._metrics[step] = saved_metrics
      if wait:
        self._manager.wait_until_finished()
        self._pending = None
      if saved_metrics is not None and self.best_metric:
        self._record_best()

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns a save that failed on storage into a ``CheckpointWriteError``
    naming the path (any other error, a bug, is raised as it is).

    An asynchronous save fails in the background and surfaces at the next
    save or wait, so the message names the step still being written, if any.
    """
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      failed = self._pending if self._pending is not None else step
      self._pending = None
      orbax_internals.release_waiting_writers(self._operations)
      cause = root_cause(e)
      if not (storage_failure(cause) or storage_failure(e)):
        raise
      fix = ("The storage did not answer; once it does," if unreachable(cause)
             else "Free space on that filesystem or make it writable (or "
             "pass another --workdir),")
      committed = self._committed_steps()
      kept = (f"The checkpoints already there (steps {committed}) are "
              "intact. " if committed else "")
      resume = (" to resume from the latest of them" if committed else "")
      raise CheckpointWriteError(
          f"Could not save the checkpoint of step {failed} to "
          f"{self.directory}: {type(cause).__name__}: {first_line(cause)}. "
          f"{kept}"
          f"{fix} then rerun the same command{resume}.") from e

  def _committed_steps(self) -> list[int]:
    """The committed step directories on disk now (an uncached listing)."""
    try:
      return sorted(m.step for m in self._step_format.find_all(self.directory))
    except Exception:  # pylint: disable=broad-except
      return []

  def _record_best(self) -> None:
    """Writes ``best.json`` (process 0, through ``fileio``: whole or not at all).

    Without a best step (none left with metrics), a stale record goes.
    """
    if jax.process_index() != 0:
      return
    path = self.directory / BEST_RECORD
    best = self.best_step()
    if best is None:
      if path.exists():
        path.unlink()
      return
    m = self.metrics(best) or {}
    record = {"step": best, "metric": self.best_metric, "mode": self.best_mode,
              "value": m.get(self.best_metric)}
    fileio.write_json(path, record)

  def _reader(self) -> ocp.CheckpointManager:
    """The manager restores go through: this process alone, no barrier.

    Orbax's restore ends in a barrier of every process; a process that
    fails to read a step never reaches it, and the others would wait there
    (and its next collective would pair with theirs). With several
    processes, each restores through a read-only manager of its own
    (``active_processes={this one}``: Orbax skips the barrier), and
    ``restore_latest`` then agrees on the outcome. Reading needs no
    collective: each process reads the shards its devices hold.
    """
    if jax.process_count() == 1:
      return self._manager
    if self._reader_manager is not None:
      self._reader_manager.reload()  # Steps saved since it listed them.
    else:
      me = jax.process_index()
      self._reader_manager = ocp.CheckpointManager(
          self.directory, item_names=("state", POSITION),
          options=ocp.CheckpointManagerOptions(
              create=False, step_name_format=self._step_format,
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  primary_host=me, active_processes={me},
                  barrier_sync_key_prefix=f"affectjax_read_{me}")))
    return self._reader_manager

  def _step_path(self, step: int) -> epath.Path:
    return ocp.step.find_step_path(self.directory, self._step_format,
                                   step=step)

  def _position(self, step: int) -> dict | None:
    """Step ``step``'s global data position ({"iterator", "global_batch_size"}).

    None if the step was saved without one. Checks that it can continue
    this run (``IncompatibleCheckpointError`` if not).
    """
    step_dir = self._step_path(step)
    if (step_dir / POSITION).exists():
      position = self._reader().restore(
          step, args=ocp.args.Composite(**{POSITION: ocp.args.JsonRestore()})
      )[POSITION]
    elif (step_dir / _LEGACY_DATA).exists():
      position = {"iterator": _legacy_position(step_dir / _LEGACY_DATA),
                  "global_batch_size": None}
    else:
      return None
    saved = position.get("global_batch_size")
    if (saved is not None and self.global_batch_size is not None
        and int(saved) != self.global_batch_size):
      raise IncompatibleCheckpointError(
          f"{step_dir} was saved with a global batch of {saved} "
          f"(--config.batch_size={saved}), but this run has "
          f"--config.batch_size={self.global_batch_size}. The data position "
          "and the schedules count global batches, so a resumed run must "
          f"keep it: rerun with --config.batch_size={saved} (on any number "
          "of processes and devices that divides it), or start over in a "
          "new --workdir.")
    return position

  def restore(self, step: int, abstract_state: Any, data_iterator=None):
    """Restores ``step`` onto ``abstract_state`` (shapes, dtypes, shardings).

    Restoring onto an abstract target is what keeps container types intact
    (without it, Orbax hands optax's namedtuple states back as plain lists)
    and what lets a job saved on one topology resume on another: the target
    carries the current mesh's shardings. The data iterator, if given, is
    set to the saved global position, after the state has been read.
    """
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; it has steps "
          f"{self.all_steps()}.")
    position = None
    if data_iterator is not None:
      position = self._position(step)
      if position is None:
        raise UnreadableCheckpointError(
            f"{self._step_path(step)} holds no data position (it was saved "
            "without the train iterator), so training cannot resume from it.")
    restored = self._reader().restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    if position is not None:
      data_iterator.set_state(position["iterator"])
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iterator=None
                     ) -> tuple[Any, int | None]:
    """Restores the newest readable step: ``(state, step)``; ``(None, None)``
    when there is no checkpoint yet.

    A step whose bytes are bad (``bytes_are_bad``: truncated or corrupt
    files) is skipped with a warning naming it and moved aside as
    ``<step>.corrupt`` (so the run can save that step again; never
    deleted); the next older one is tried. Any other error raises
    ``CheckpointReadError`` and leaves every step in place: a storage
    timeout or a full device memory says nothing about the checkpoint, and
    neither does a NOT_FOUND while the checkpoint directory or the step's
    directory is not there (``_absent``: a mount gone).
    Every process reads on its own, then all take the same decision: if any
    process hit another error, all raise; else if any found bad bytes, all
    fall back. ``IncompatibleCheckpointError`` is raised, not skipped; when
    every step's bytes are bad a ``RuntimeError`` names the newest step's
    error, rather than the run silently starting over.
    """
    bad: list[tuple[int, Exception | None]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      error = None
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      absent = None if error is None else self._absent(step, error)
      outcome = (_READ if error is None else
                 _BAD_BYTES if bytes_are_bad(error) and absent is None
                 else _FAILED)
      outcomes = _gather(outcome)
      if _FAILED in outcomes:
        where = ("" if outcome == _FAILED else " on process "
                 f"{outcomes.index(_FAILED)} (its log names the error)")
        if absent is not None:
          why = (f": {absent} ({type(error).__name__}: "
                 f"{first_line(error)}). That is not a sign of damaged "
                 "files, so every step stays where it is: rerun once the "
                 "file system or bucket holding it is mounted and reachable "
                 "again.")
        else:
          why = ((f": {type(error).__name__}: {first_line(error)}"
                  if outcome == _FAILED else "")
                 + ". That is not a sign of damaged files, so every step "
                 "stays where it is: rerun once the storage or device is "
                 "healthy"
                 + ("" if error is not None and storage_failure(error) else
                    " (or, if the model or optimizer config changed since "
                    "the step was saved, train in a new --workdir)") + ".")
        raise CheckpointReadError(
            f"Could not read checkpoint step {step} in {self.directory}"
            f"{where}{why}") from error
      if _BAD_BYTES in outcomes:
        logging.warning(
            "Checkpoint step %d in %s cannot be read (%s); falling back to "
            "the one before it.", step, self.directory,
            f"{type(error).__name__}: {first_line(error)}" if error else
            f"its files are damaged on process {outcomes.index(_BAD_BYTES)}")
        bad.append((step, error))
        continue
      if bad:
        self._set_aside([s for s, _ in bad])
      return state, step
    if bad:
      step, error = bad[0]
      raise RuntimeError(
          f"No checkpoint in {self.directory} can be restored (steps "
          f"{[s for s, _ in bad]}: their files are damaged); the newest, "
          f"step {step}, failed with "
          + (f"{type(error).__name__}: {first_line(error)}" if error else
             "an error on another process")
          + ". Move them away to start over, or train in a new --workdir."
      ) from error
    return None, None

  def _absent(self, step: int, error: BaseException) -> str | None:
    """Why reading ``step`` failed for want of the storage rather than of a
    file inside the step, or None.

    Looked at after the read failed: the checkpoint directory (a file system
    not mounted, a bucket prefix gone) or the step's directory is not there;
    or the file tensorstore reported NOT_FOUND is there now (a mount that
    came back). Either way the step's own files say nothing about damage.
    A file missing inside a step that is there is damage (None here).
    """
    try:
      if not self.directory.exists():
        return (f"{self.directory} is not there (is its file system "
                "mounted?)")
      step_dir = self.directory / self._step_format.build_name(step)
      if not step_dir.exists():
        return f"its directory {step_dir} is not there"
      gone = not_found_path(error)
      if gone is not None and epath.Path(gone).exists():
        return (f"{gone} was not found while reading, and is there now (a "
                "file system that came back?)")
    except OSError as e:  # The storage cannot even be asked.
      return f"{self.directory} cannot be listed ({e})"
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps to ``<step>.corrupt`` (process 0), out of
    Orbax's sight, keeping their files for inspection. Never deletes: where
    the storage cannot rename a directory (gs://), the run stops with a
    message saying which step to move away."""
    failed = None
    if jax.process_index() == 0:
      for step in steps:
        path = self._step_path(step)
        aside, n = path.parent / f"{path.name}.corrupt", 1
        while aside.exists():
          n += 1
          aside = path.parent / f"{path.name}.corrupt{n}"
        try:
          path.rename(aside)
        except OSError as e:  # e.g. no directory renames on this storage.
          failed = (f"Checkpoint step {step} in {self.directory} is damaged "
                    f"and could not be moved aside to {aside} ({e}); move or "
                    "copy it away yourself, then rerun the same command.")
          break
        logging.warning("Moved the unreadable checkpoint step %d to %s.",
                        step, aside)
    if _FAILED in _gather(_FAILED if failed else _READ):
      raise CheckpointReadError(failed or "Process 0 could not move a damaged "
                                "checkpoint step aside (its log says which).")
    self._manager.reload()
    if self._reader_manager is not None:
      self._reader_manager.reload()
    for step in steps:
      self._metrics.pop(step, None)
    if self.best_metric:
      self._record_best()

  def wait(self) -> None:
    """Blocks until any asynchronous save has been committed."""
    with self._writing(None):
      self._manager.wait_until_finished()
      self._pending = None

  def close(self) -> None:
    """Commits any asynchronous save and closes the manager.

    A failure already raised by ``save`` or ``wait`` is not raised again
    here (the run is already unwinding with it).
    """
    reported = self._failed
    try:
      self.wait()
    except CheckpointWriteError:
      if not reported:
        raise
    finally:
      with (contextlib.suppress(Exception) if reported
            else contextlib.nullcontext()):
        if self._reader_manager is not None:
          self._reader_manager.close()
        self._manager.close()


def _legacy_position(data_dir: epath.Path) -> dict:
  """The iterator state of a step saved with Grain's per-process files.

  Every process of this project saves the same (global) position, so
  process 0's is the job's; files that disagree are refused.
  """
  files = sorted(data_dir.glob("process_*-of-*.json"))
  states = {f.name: json.loads(f.read_text()) for f in files}
  first = [n for n in states if n.startswith("process_0-of-")]
  if not first:
    raise UnreadableCheckpointError(
        f"{data_dir} holds no process_0-of-N.json (it has "
        f"{sorted(states)}): its data position is lost.")
  if len({json.dumps(s, sort_keys=True) for s in states.values()}) > 1:
    raise IncompatibleCheckpointError(
        f"{data_dir}: the processes saved different data positions "
        f"({', '.join(f'{n}: {s}' for n, s in sorted(states.items()))}), so "
        "there is no one global position to resume from. Train in a new "
        "--workdir, or restore the state alone (evaluate, export).")
  return states[first[0]]


def read_best_record(directory) -> dict | None:
  """``best.json`` of a checkpoint directory, or None if there is none."""
  path = _as_path(directory) / BEST_RECORD
  if not path.exists():
    return None
  return json.loads(path.read_text())


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, for restoring."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
