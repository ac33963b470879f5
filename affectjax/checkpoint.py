"""One Orbax manager for the train state and the Grain iterator.

A checkpoint step directory holds two items (plus Orbax's own ``metrics``):
  * ``state``: the train-state pytree (params, BatchNorm statistics, optimizer
    state, step, EMA weights if any), saved asynchronously;
  * ``data``: the Grain iterator position of every process, so a resumed run
    sees exactly the batches an uninterrupted one would have seen.

Which steps stay on disk is Orbax's preservation policy: the latest ``keep``
steps, and (when ``best_metric`` is set) also the best step by that metric
among those saved with ``metrics=``. The best step is recorded, beside the
step directories, in ``best.json`` (step, metric, mode, value) for people and
scripts; ``best_step()`` asks Orbax, which reads every step's saved metrics.

Orbax writes each step under a temporary name and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact. The directory is
any ``etils.epath`` path (local, ``gs://...``); nothing here uses ``os.path``
or ``open()`` on it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from affectjax import fileio

BEST_RECORD = "best.json"
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
  """

  def __init__(self, directory, *, every_steps: int, keep: int,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in _MODES:
      raise ValueError(f"--config.checkpoint.best_mode={best_mode!r}: use "
                       "'max' or 'min'.")
    if keep < 1:
      raise ValueError(f"--config.keep_checkpoints={keep} must be >= 1.")
    self.directory = _as_path(directory)
    self.every_steps = every_steps
    self.best_metric = best_metric or None
    self.best_mode = best_mode
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if self.best_metric:
      best_fn = _MetricKey(self.best_metric, best_mode)
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save,
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(
            policies=policies))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))
    # step -> saved metrics (None: saved without). Orbax reads metrics from
    # committed step directories only; this also covers an async save that
    # is still being written.
    self._metrics: dict[int, dict | None] = {}

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The best step saved with metrics; None if no step has metrics.

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
    # Ties go to the earlier step (the first to reach the value).
    return max(ranked, key=lambda ms: (sign * key(ms[0]), -ms[1]))[1]

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
    """Saves ``state`` (and the iterator position) at ``step``.

    Args:
      step: the train step.
      state: the train-state pytree.
      data_iterator: a Grain iterator, checkpointed with the state.
      metrics: the selection split's evaluation at this step, when the save
        coincides with one; ranks the step for best-keeping. Must contain
        ``best_metric``.
      wait: block until the checkpoint is committed (the preemption handler
        needs the checkpoint on disk before the process exits).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved_metrics = None
    if metrics is not None:
      saved_metrics = scalar_metrics(metrics)
      if self.best_metric and self.best_metric not in saved_metrics:
        raise KeyError(
            f"--config.checkpoint.best_metric={self.best_metric!r} is not an "
            f"evaluation metric; choose one of {sorted(saved_metrics)}.")
    self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                       metrics=saved_metrics if self.best_metric else None)
    self._metrics[step] = saved_metrics
    if wait:
      self.wait()
    if saved_metrics is not None and self.best_metric:
      self._record_best()

  def _record_best(self) -> None:
    """Writes ``best.json`` (process 0; temporary name, then rename)."""
    if jax.process_index() != 0:
      return
    best = self.best_step()
    if best is None:
      return
    m = self.metrics(best) or {}
    record = {"step": best, "metric": self.best_metric, "mode": self.best_mode,
              "value": m.get(self.best_metric)}
    fileio.write_json(self.directory / BEST_RECORD, record)

  def restore(self, step: int, abstract_state: Any, data_iterator=None):
    """Restores ``step`` onto ``abstract_state`` (shapes, dtypes, shardings).

    Restoring onto an abstract target is what keeps container types intact:
    without it, Orbax hands optax's namedtuple states back as plain lists.
    The data iterator, if given, is restored in place.
    """
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; it has steps "
          f"{self.all_steps()}.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until any asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def read_best_record(directory) -> dict | None:
  """``best.json`` of a checkpoint directory, or None if there is none."""
  path = _as_path(directory) / BEST_RECORD
  if not path.exists():
    return None
  return json.loads(path.read_text())


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, for restoring."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
