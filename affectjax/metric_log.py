"""Run metrics: ``WORKDIR/metrics.jsonl`` plus TensorBoard scalars.

``metrics.jsonl`` has one JSON object per line, appended across resumes. A
resumed run first drops the lines of steps after the step it resumed from
(written by a run that died before its next checkpoint, and about to be
replayed), so the file holds each step once; TensorBoard gets the same
``purge_step``.
Train lines carry ``"split": "train"``, ``step`` and ``loss``; evaluation
lines carry ``"split": "val"``, ``step``, ``loss`` and the evaluation metrics.
NaN/inf values are written as ``null`` so every line stays strict JSON.

Every scalar is also written to ``WORKDIR/tensorboard`` as ``<split>/<name>``
(``tensorboard --logdir WORKDIR``). Only process 0 writes either.
"""
from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
import tensorboardX
from etils import epath


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


class MetricLog:
  """Appends metric records to ``metrics.jsonl`` in ``workdir`` (any epath).

  Args:
    workdir: the run directory.
    resume_step: the step this run starts from; lines of later steps are
      dropped (rewritten through a temporary file and a rename).
  """

  def __init__(self, workdir, *, resume_step: int | None = None):
    workdir = epath.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    self._enabled = jax.process_index() == 0
    self._tb = None
    if self._enabled:
      if resume_step is not None:
        self._truncate_after(resume_step)
      self._tb = tensorboardX.SummaryWriter(
          str(workdir / "tensorboard"),
          purge_step=None if not resume_step else int(resume_step) + 1)

  def _truncate_after(self, step: int) -> None:
    records = self.read()
    keep = [r for r in records if int(r["step"]) <= step]
    if len(keep) == len(records):
      return
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n"
                           for r in keep))
    tmp.replace(self.path)

  def write(self, split: str, step: int, **values: Any) -> dict:
    record = {"split": split, "step": int(step), **_jsonable(values)}
    if self._enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
      for name, value in record.items():
        if isinstance(value, float) and name != "step":
          self._tb.add_scalar(f"{split}/{name}", value, int(step))
      self._tb.flush()
    return record

  def image(self, tag: str, step: int, image: np.ndarray) -> None:
    """An (H, W, 3) uint8 image in TensorBoard (e.g. the confusion matrix)."""
    if self._enabled:
      self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines()
            if line.strip()]

  def has(self, split: str, step: int) -> bool:
    return any(r["split"] == split and r["step"] == step for r in self.read())
