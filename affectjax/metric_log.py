"""Run metrics: ``WORKDIR/metrics.jsonl`` plus TensorBoard scalars.

``metrics.jsonl`` has one JSON object per line, appended across resumes. A
resumed run first drops the lines of steps after the step it resumed from
(written by a run that died before its next checkpoint, and about to be
replayed), so the file holds each step once; TensorBoard gets the same
``purge_step``.
Train lines carry ``"split": "train"``, ``step`` and ``loss``; evaluation
lines carry ``"split": "val"``, ``step``, ``loss`` and the evaluation metrics.
Values go through ``fileio.to_json_compatible`` (NaN/inf are written as
``null``), so every line stays strict JSON.

``read(workdir)`` is the one reader of the file (the trainer's resume, early
stopping and the run report use it). A last line that does not parse is a
write in progress, or one cut short by a killed run: it is skipped, and a
resumed run drops it from the file.

Every scalar is also written to ``WORKDIR/tensorboard`` as ``<split>/<name>``
(``tensorboard --logdir WORKDIR``). Only process 0 writes either.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from affectjax import fileio

FILE_NAME = "metrics.jsonl"


def _parse(path: epath.Path) -> tuple[list[dict], bool]:
  """(records, whether a torn last line was skipped)."""
  if not path.exists():
    return [], False
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        return records, True
      raise ValueError(f"{path} line {i + 1} is not JSON ({e}); only the last "
                       "line can be cut short by a killed run. Remove or "
                       "repair that line.") from None
  return records, False


def read(workdir) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` in file order ([] if none)."""
  return _parse(epath.Path(workdir) / FILE_NAME)[0]


class MetricLog:
  """Appends metric records to ``metrics.jsonl`` in ``workdir`` (any epath).

  Args:
    workdir: the run directory.
    resume_step: the step this run starts from; lines of later steps are
      dropped (the file is rewritten through ``fileio.write_text``).
  """

  def __init__(self, workdir, *, resume_step: int | None = None):
    workdir = epath.Path(workdir)
    self.path = workdir / FILE_NAME
    self._enabled = jax.process_index() == 0
    self._tb = None
    if self._enabled:
      if resume_step is not None:
        self._truncate_after(resume_step)
      # Imported here: readers of the file (the report, the tools) need
      # none of TensorBoard's (slow to import) writer.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          str(workdir / "tensorboard"),
          purge_step=None if not resume_step else int(resume_step) + 1)

  def _truncate_after(self, step: int) -> None:
    records, torn = _parse(self.path)
    keep = [r for r in records if int(r["step"]) <= step]
    if len(keep) == len(records) and not torn:
      return
    fileio.write_text(self.path, "".join(fileio.dumps(r) + "\n" for r in keep))

  def write(self, split: str, step: int, **values: Any) -> dict:
    record = {"split": split, "step": int(step),
              **fileio.to_json_compatible(values)}
    if self._enabled:
      line = fileio.dumps(record) + "\n"
      if "://" in str(self.path):
        # Object stores (gs://, s3://) cannot append: gcsfs's "a" mode
        # silently overwrites, leaving one line. Rewrite the file whole.
        old = self.path.read_text() if self.path.exists() else ""
        fileio.write_text(self.path, old + line)
      else:
        with self.path.open("a") as f:
          f.write(line)
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
    return read(self.path.parent)

  def has(self, split: str, step: int) -> bool:
    return any(r["split"] == split and r["step"] == step for r in self.read())
