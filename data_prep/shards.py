"""Converting one shard: rows -> face crops -> records -> one ArrayRecord file.

A shard is the unit of work, of parallelism and of resumption:
  1. records are written to `<shard>.tmp-<pid>`;
  2. the finished file is renamed to its final name;
  3. its stats (counts, skips, class histogram, sha256) are written, also via
     a temp name, to `.prep_state/<shard>.json`, the completion marker.
A crash at any point leaves either no marker (the shard is redone from
scratch) or a complete shard. Since a shard's rows and their order are fixed
by the row index (see rows.py), a redone shard is byte-identical.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from affectjax import data as affect_data
from affectjax import face_crop
from data_prep import images
from data_prep import labels
from data_prep import rows

STATE_DIR = ".prep_state"
TMP_TAG = ".tmp-"
MAX_SKIP_EXAMPLES = 5  # Per reason and shard; the manifest keeps the first 5.
# group_size:1 makes every record individually addressable: random access
# (Grain's global shuffle) reads one record, not a 64k-record chunk.
# No compression: JPEG bytes do not compress, and raw pixels exist for speed
# (zstd saves some disk but costs read rate and preparation time; see
# docs/BENCHMARKS.md).
WRITER_OPTIONS = {"jpeg": "group_size:1,uncompressed",
                  "raw": "group_size:1,uncompressed"}


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  image_size: int
  encoding: str
  jpeg_quality: int
  margin: float
  num_classes: int


@dataclasses.dataclass
class ShardTask:
  output_dir: str
  split: str
  shard: int
  num_shards: int
  part: Any  # A rows.RowIndex block: iterable of Row | Skip.
  options: ConvertOptions

  @property
  def filename(self) -> str:
    return affect_data.shard_filename(self.split, self.shard, self.num_shards)


def state_path(output_dir: str, filename: str) -> str:
  return os.path.join(output_dir, STATE_DIR, filename + ".json")


def load_done(output_dir: str, filename: str) -> dict | None:
  """The shard's stats if it is complete (marker present, file intact)."""
  try:
    with open(state_path(output_dir, filename)) as fp:
      stats = json.load(fp)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  path = os.path.join(output_dir, filename)
  if not os.path.exists(path) or os.path.getsize(path) != stats["num_bytes"]:
    return None
  return stats


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}{TMP_TAG}{os.getpid()}"
  with open(tmp, "w") as fp:
    json.dump(obj, fp, indent=1, sort_keys=True)
    fp.write("\n")
  os.replace(tmp, path)


def convert(row: rows.Row, opts: ConvertOptions
            ) -> tuple[bytes, tuple[int, int]]:
  """One row -> (serialized record, (height, width) of the source crop).

  The crop size is in source pixels (before any decoder downscaling): a side
  below `opts.image_size` means the face was upscaled. Raises BadImage /
  OSError for rows to skip.
  """
  if row.image is not None:  # Pixels from the annotation file (FER2013).
    data = row.image
  else:
    file = rows.find_case_variant(row.file)
    if file is None:
      raise FileNotFoundError(row.file)
    with open(file, "rb") as fp:
      data = fp.read()
  size = opts.image_size
  crop = face_crop.crop_face(data, row.box, opts.margin, size)
  x0, y0, x1, y1 = crop.box
  lm = None
  if row.landmarks is not None:
    # Source pixels -> crop pixels -> output pixels.
    lm = ((row.landmarks - np.asarray([x0, y0], np.float32)) *
          np.asarray([size / (x1 - x0), size / (y1 - y0)], np.float32))
  record = affect_data.encode_record(
      image=images.encode(crop.image, opts.encoding, opts.jpeg_quality),
      expression=row.expression, valence=row.valence, arousal=row.arousal,
      landmarks=lm, path=row.path)
  return record, crop.source_shape


class _Stats:
  """Per-shard counts: written, skipped by reason, examples, histogram, and
  how many written faces were upscaled (source crop side < image_size)."""

  def __init__(self, num_classes: int):
    self.written = 0
    self.upscaled = 0
    self.min_source_side: int | None = None
    self.skipped: collections.Counter = collections.Counter()
    self.examples: dict[str, list] = collections.defaultdict(list)
    self.class_counts = [0] * num_classes

  def skip(self, reason: str, number: int, path: str, detail: str) -> None:
    self.skipped[reason] += 1
    if len(self.examples[reason]) < MAX_SKIP_EXAMPLES:
      self.examples[reason].append(
          {"row": int(number), "path": path, "detail": detail[:300]})


def run(task: ShardTask,
        progress: Callable[[int], None] | None = None) -> dict:
  """Converts and writes one shard; returns (and persists) its stats."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  opts = task.options
  final = os.path.join(task.output_dir, task.filename)
  tmp = f"{final}{TMP_TAG}{os.getpid()}"
  stats = _Stats(opts.num_classes)
  writer = array_record_module.ArrayRecordWriter(
      tmp, WRITER_OPTIONS[opts.encoding])
  pending = 0
  try:
    for item in task.part:
      pending += 1
      if progress is not None and pending >= 16:
        progress(pending)
        pending = 0
      if isinstance(item, rows.Skip):
        stats.skip(item.reason, item.number, item.path, item.detail)
        continue
      if item.expression >= opts.num_classes:
        stats.skip(labels.EXCLUDED_CLASS, item.number, item.path,
                   f"class {item.expression} is not in the "
                   f"{opts.num_classes}-class protocol")
        continue
      try:
        record, (h, w) = convert(item, opts)
      except face_crop.BadImage as e:
        stats.skip(e.reason, item.number, item.path, str(e))
        continue
      except FileNotFoundError:
        stats.skip(labels.MISSING_FILE, item.number, item.path,
                   "file does not exist")
        continue
      except OSError as e:  # Unreadable: permissions, a directory, I/O error.
        stats.skip(labels.CORRUPT_IMAGE, item.number, item.path,
                   f"cannot read file: {e}")
        continue
      writer.write(record)
      stats.written += 1
      stats.class_counts[item.expression] += 1
      side = min(h, w)
      if side < opts.image_size:
        stats.upscaled += 1
      if stats.min_source_side is None or side < stats.min_source_side:
        stats.min_source_side = side
  finally:
    writer.close()
  if progress is not None and pending:
    progress(pending)
  sha = hashlib.sha256()
  with open(tmp, "rb") as fp:
    for chunk in iter(lambda: fp.read(1 << 20), b""):
      sha.update(chunk)
  num_bytes = os.path.getsize(tmp)
  os.replace(tmp, final)
  result = {
      "file": task.filename, "split": task.split, "shard": task.shard,
      "num_examples": stats.written, "num_bytes": num_bytes,
      "sha256": sha.hexdigest(), "skipped": dict(sorted(
          stats.skipped.items())),
      "skip_examples": dict(sorted(stats.examples.items())),
      "class_counts": stats.class_counts,
      "upscaled": stats.upscaled, "min_source_side": stats.min_source_side,
  }
  write_json_atomic(state_path(task.output_dir, task.filename), result)
  return result
