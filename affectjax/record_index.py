"""Where each record's image bytes lie in its ArrayRecord shard, and its labels.

The JPEG path decodes straight from a memory map of the shard files (no
record read, copy or protobuf parse) when it knows each image's byte span
in its file. ArrayRecord files are riegeli files: a 24-byte block header sits
at every multiple of 64 KiB of the file, inside whatever record spans it,
and the rest of an uncompressed record's bytes lie in order. `build` reads
every record once, finds its image bytes in the file and records the span
(offset -1 where it cannot: a layout this does not know, e.g. compressed
shards, whose records are then read as records).

This module owns the index and the riegeli layout; where the index is kept
and when it is built is `affectjax.pixel_cache`'s.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import mmap
import os

import numpy as np

from affectjax import data

# A block header at every multiple of RIEGELI_BLOCK bytes of the file.
RIEGELI_BLOCK = 1 << 16
RIEGELI_BLOCK_HEADER = 24
# How far past the previous record a record's image bytes are looked for.
_SEARCH_SLACK = 1 << 16


@dataclasses.dataclass
class RecordIndex:
  """Per record: shard, byte offset and length of its image in the shard
  file (offset -1: not stored contiguously, read the record instead), and
  its labels."""
  shard: np.ndarray  # int32
  offset: np.ndarray  # int64
  length: np.ndarray  # int64
  expression: np.ndarray  # int32
  valence: np.ndarray  # float32
  arousal: np.ndarray  # float32

  FIELDS = ("shard", "offset", "length", "expression", "valence", "arousal")

  def __len__(self) -> int:
    return len(self.shard)

  def arrays(self) -> dict[str, np.ndarray]:
    """The fields by name (what `np.savez` stores)."""
    return {k: getattr(self, k) for k in self.FIELDS}

  @classmethod
  def load(cls, path: str) -> RecordIndex:
    """The index stored at `path` (an `.npz` of `arrays()`)."""
    with np.load(path) as z:
      return cls(**{k: z[k] for k in cls.FIELDS})


def assemble(view, offset: int, length: int) -> bytes:
  """The `length` stored bytes starting at file `offset`, skipping the block
  headers they span."""
  parts, pos, left = [], offset, length
  while left:
    boundary = (pos // RIEGELI_BLOCK + 1) * RIEGELI_BLOCK
    take = min(boundary - pos, left)
    parts.append(view[pos:pos + take])
    pos, left = pos + take, left - take
    if pos == boundary:
      pos += RIEGELI_BLOCK_HEADER
  return b"".join(parts)


def contiguous(offset: np.ndarray, length: np.ndarray) -> np.ndarray:
  """Whether each stored span [offset, offset + length) has no block header."""
  return offset // RIEGELI_BLOCK == (offset + length - 1) // RIEGELI_BLOCK


def _index_shard(path: str, start: int, stop: int, src, out: dict) -> None:
  """Fills `out[...][start:stop]` for one shard: reads its records in order
  and finds each image's bytes in the file, each after the previous one.

  The first bytes of the image are looked for after the previous image;
  the bytes found there (block headers skipped) must equal the image, else
  the record keeps offset -1 and is read as a record (a layout this does
  not know, e.g. compressed shards).
  """
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0,
                                        access=mmap.ACCESS_READ) as mm:
    pos, pending, chunk = 0, 0, 1024
    for a in range(start, stop, chunk):
      records = src.read_records(np.arange(a, min(stop, a + chunk)))
      for i, rec in zip(range(a, a + len(records)), records):
        try:
          image, expr, val, aro = data.parse_training_fields(rec)
        except data.RecordError as e:
          raise data.RecordError(
              f"Record {i} of the {src.split!r} split ({path}): {e}. "
              "Re-prepare the data with `python -m data_prep.affectnet`."
          ) from e
        out["expression"][i], out["valence"][i] = expr, val
        out["arousal"][i] = aro
        length = len(image)
        out["length"][i] = length
        pending += len(rec) + RIEGELI_BLOCK_HEADER * (
            len(rec) // RIEGELI_BLOCK + 1)
        offset = mm.find(image[:64], pos, pos + pending + _SEARCH_SLACK)
        if length and offset >= 0 and assemble(mm, offset, length) == image:
          out["offset"][i] = offset
          pos, pending = offset + length, 0


def _labels_only(path, start, stop, src, out) -> None:
  """A shard not on a local file system: labels only (no offsets)."""
  del path
  for i, rec in zip(range(start, stop),
                    src.read_records(np.arange(start, stop))):
    _, out["expression"][i], out["valence"][i], out["arousal"][i] = (
        data.parse_training_fields(rec))


def build(src: data.AffectNetSource, threads: int) -> RecordIndex:
  """Reads every record of `src` once (one shard per thread, on `threads`
  threads) and returns its index."""
  src._open()  # pylint: disable=protected-access
  starts = src._starts  # pylint: disable=protected-access
  n = int(starts[-1])
  out = {"shard": np.repeat(np.arange(len(src.paths), dtype=np.int32),
                            np.diff(starts)),
         "offset": np.full((n,), -1, np.int64),
         "length": np.zeros((n,), np.int64),
         "expression": np.zeros((n,), np.int32),
         "valence": np.zeros((n,), np.float32),
         "arousal": np.zeros((n,), np.float32)}
  local = all(os.path.isfile(p) for p in src.paths)
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    jobs = [pool.submit(_index_shard if local else _labels_only, p,
                        int(starts[s]), int(starts[s + 1]), src, out)
            for s, p in enumerate(src.paths)]
    for j in jobs:
      j.result()
  return RecordIndex(**out)
