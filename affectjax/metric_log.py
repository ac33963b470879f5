"""Run metrics: ``WORKDIR/metrics.jsonl`` plus TensorBoard scalars.

``metrics.jsonl`` has one JSON object per line, appended across resumes.
Train lines carry ``"split": "train"``, ``step`` and ``loss``; evaluation
lines carry ``"split": "val"``, ``step``, ``loss`` and the evaluation metrics.
NaN/inf values are written as ``null`` so every line stays strict JSON.

Every scalar is also written to ``WORKDIR/tensorboard`` as ``<split>/<name>``
(``tensorboard --logdir WORKDIR``). Only process 0 writes either.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
import tensorboardX


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
  """Appends metric records to ``metrics.jsonl`` in ``workdir``."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._enabled = jax.process_index() == 0
    self._tb = None
    if self._enabled:
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, split: str, step: int, **values: Any) -> dict:
    record = {"split": split, "step": int(step), **_jsonable(values)}
    if self._enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
      for name, value in record.items():
        if isinstance(value, float) and name != "step":
          self._tb.add_scalar(f"{split}/{name}", value, int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def has(self, split: str, step: int) -> bool:
    return any(r["split"] == split and r["step"] == step for r in self.read())
