"""predict's output table: its columns, and rows written as they come.

  columns(names, videos, smooth)   the table's columns, in order
  RowWriter(output, columns)       rows appended as they come; renamed at close
  write_rows(rows, columns, out)   a whole list of rows at once

``.csv`` (floats with 6 decimals, None empty), or JSON lines for
``.jsonl``/``.json``. ``RowWriter`` appends each row to ``OUTPUT.partial``
and flushes it, so memory stays flat however long the videos are and a run
that is stopped (Ctrl-C, kill, a lost node) leaves every row written up to
then in ``OUTPUT.partial``; a run that ends renames it to ``OUTPUT``, so a
file of the final name is always complete. For an output on gs:// (or
another remote ``epath``) the partial file is a local temporary file (its
path is logged at start), copied to the output at the end.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from typing import Iterable, Sequence

from absl import logging
from etils import epath

from affectjax import tracks

VIDEO_COLUMNS = ("frame", "time", "track")
SMOOTH_COLUMNS = tracks.SMOOTH_COLUMNS


def columns(names: Sequence[str], videos: bool = False, smooth: bool = False,
            scores: bool = False) -> list[str]:
  """The table's columns: ``videos`` adds frame, time and track (empty on
  photo rows) and ``face_score``; ``scores`` adds ``face_score`` alone
  (photos with a detector); ``smooth`` the smoothed columns at the end."""
  return ["path", *(VIDEO_COLUMNS if videos else ()), "face_box",
          *(("face_score",) if videos or scores else ()), "status", "error",
          "class", "name", *[f"prob_{n}" for n in names], "valence",
          "arousal", *(SMOOTH_COLUMNS if videos and smooth else ())]


def _is_remote(path) -> bool:
  return "://" in os.fspath(path)


class RowWriter:
  """Appends rows to ``OUTPUT.partial`` as they come (module docstring).

  Use as a context manager: a clean exit renames the partial file to
  ``output``; an exception leaves it (with every row written so far).
  """

  def __init__(self, output, columns_: Sequence[str]):
    self.output = epath.Path(output)
    self.columns = list(columns_)
    self.rows = 0
    self._json = self.output.suffix.lower() in (".jsonl", ".json")
    if _is_remote(self.output):
      fd, self.partial = tempfile.mkstemp(prefix=self.output.name + ".",
                                          suffix=".partial")
      os.close(fd)
      logging.info("Rows for %s are written to %s until the run ends",
                   self.output, self.partial)
    else:
      self.output.parent.mkdir(parents=True, exist_ok=True)
      self.partial = os.fspath(self.output) + ".partial"
    self._f = open(self.partial, "w", newline="", encoding="utf-8")
    self._csv = None
    if not self._json:
      self._csv = csv.DictWriter(self._f, fieldnames=self.columns,
                                 lineterminator="\n", extrasaction="ignore")
      self._csv.writeheader()
      self._f.flush()

  def write(self, row: dict) -> None:
    """One row, flushed to the file at once."""
    if self._json:
      self._f.write(json.dumps({c: row.get(c) for c in self.columns}) + "\n")
    else:
      self._csv.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v)
                          for k, v in row.items()})
    self._f.flush()
    self.rows += 1

  def write_all(self, rows: Iterable[dict]) -> None:
    for row in rows:
      self.write(row)

  def close(self) -> None:
    """Closes the file and gives it its final name."""
    self._f.close()
    if _is_remote(self.output):
      with open(self.partial, "rb") as src, self.output.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
      os.remove(self.partial)
    else:
      os.replace(self.partial, self.output)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:
      self._f.close()
      logging.warning("Stopped: the %d rows written so far are in %s",
                      self.rows, self.partial)


def write_rows(rows: Iterable[dict], columns_: Sequence[str], output) -> None:
  """CSV, or JSON lines for ``.jsonl``/``.json``, through ``RowWriter``."""
  with RowWriter(output, columns_) as w:
    w.write_all(rows)
