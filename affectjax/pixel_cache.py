"""The decoded-image cache: a split's pixels and labels, memory-mapped, per host.

Every epoch of a JPEG dataset would otherwise read, parse and decode every
image again, although AffectNet decoded at the host size fits the RAM or the
local disk of a GPU host. `--config.data.cache` chooses:

  auto  (default) a cache under ~/.cache/affectjax/pixels (or
        $AFFECTJAX_CACHE_DIR/pixels) when it fits the
        free space there with a margin; otherwise only the record index
        (and nothing if that location cannot be written);
  none  no files: read and decode the ArrayRecords every epoch;
  DIR   a cache under DIR, whatever its size (an error if it cannot fit).

Two files per split, both under `<location>/<key>/`, where the key is a
hash of the split's shard checksums and sizes from the prepared dir's
manifest.json (so re-preparing the data starts a new cache, and the stale
one of the same dir is removed):

  <split>.index.npz   where each record's image bytes lie in its shard file
                      (so the JPEG path decodes straight from a memory map,
                      with no record read, copy or protobuf parse) and the
                      expression, valence and arousal of every record;
  <split>-<S>px.npy   uint8 (n, S, S, 3): every image decoded at the host size
                      S by the same decoder as the JPEG path, so its pixels are
                      bit-identical to an uncached run's.

A batch from the cache is a vectorized gather (`np.take` from the memory
map, which releases the GIL) plus three label gathers: no Python per image.

Building: the first process to need a file takes a lock file next to it
(`flock`, released by the kernel even on kill -9), writes the file under a
temporary name, flushes it and renames it into place; processes of the same
host wait for it and then reuse it, and a later build removes temporaries a
killed build left. A file is only ever opened under its final name, so a
killed build is never read. Each host keeps its own cache (the location is
local); nothing in it depends on the process count.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import mmap
import os
import shutil
import socket
from typing import Callable

import numpy as np
from absl import logging

from affectjax import data

# `auto`'s location; the environment variable AFFECTJAX_CACHE_DIR moves it
# (the test suite points it at a temporary directory of its own).
DEFAULT_LOCATION = os.path.join(
    os.environ.get("AFFECTJAX_CACHE_DIR", "~/.cache/affectjax"), "pixels")
# Bump when the layout of either file changes: old caches are then ignored.
FORMAT_VERSION = 1
# `auto` leaves at least this much of the location's file system free.
MARGIN_FRACTION = 0.10
MARGIN_MIN_BYTES = 2 << 30
# How far past the previous record a record's image bytes are looked for.
_SEARCH_SLACK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where a split's cache lives and whether its pixels are cached.

  `directory` is None when nothing is cached (`none`, or no usable
  location); `pixels` says whether the decoded pixels are (else only the
  record index); `reason` is the why, for the log line.
  """
  directory: str | None
  pixels: bool
  split: str
  size: int
  num_examples: int
  pixel_bytes: int
  reason: str

  @property
  def index_path(self) -> str:
    return os.path.join(self.directory, f"{self.split}.index.npz")

  @property
  def pixels_path(self) -> str:
    return os.path.join(self.directory, f"{self.split}-{self.size}px.npy")


def setting(config) -> str:
  """`config.data.cache` ('auto' for configs written before it existed)."""
  return str(config.data.get("cache", "auto")).strip() or "none"


def data_key(manifest: dict, split: str) -> str | None:
  """Hash of the split's shard checksums and sizes in the prepared dir's
  ``manifest``, or None if it has no checksums (data prepared by an old
  data_prep)."""
  shards = manifest.get("splits", {}).get(split, {}).get("shards", [])
  if not shards or any("sha256" not in s for s in shards):
    return None
  desc = {"format": FORMAT_VERSION, "split": split,
          "encoding": manifest.get("encoding"),
          "image_size": manifest.get("image_size"),
          "shards": [[s["sha256"], s.get("num_bytes")] for s in shards]}
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _free_bytes(path: str) -> tuple[int, int]:
  """(free, total) bytes of the file system holding `path` (or its parent)."""
  p = os.path.abspath(path)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  usage = shutil.disk_usage(p)
  return usage.free, usage.total


def plan(config, src: data.AffectNetSource, size: int) -> Plan:
  """Decides whether and where `src`'s split is cached at side `size`."""
  value = setting(config)
  n = len(src)
  pixel_bytes = n * size * size * 3
  common = dict(split=src.split, size=size, num_examples=n,
                pixel_bytes=pixel_bytes)
  if value == "none":
    return Plan(None, False, reason="--config.data.cache=none", **common)
  key = data_key(src.manifest, src.split)
  if key is None:
    reason = (f"{config.data.dir}/manifest.json has no shard checksums; "
              "re-prepare the data with `python -m data_prep.affectnet` to "
              "cache it")
    if value != "auto":
      raise ValueError(f"--config.data.cache={value}: {reason}.")
    return Plan(None, False, reason=reason, **common)
  forced = value != "auto"
  base = os.path.expanduser(value if forced else DEFAULT_LOCATION)
  try:
    os.makedirs(base, exist_ok=True)
    writable = os.access(base, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  if not writable:
    if forced:
      raise ValueError(f"--config.data.cache={value}: cannot create or write "
                       "that directory; choose a writable local directory, "
                       "or use --config.data.cache=none.")
    return Plan(None, False, reason=f"{base} is not writable", **common)
  directory = os.path.join(base, key[:24])
  pixels_path = os.path.join(directory, f"{src.split}-{size}px.npy")
  if os.path.exists(pixels_path):
    return Plan(directory, True, reason="built earlier, reused", **common)
  free, total = _free_bytes(directory)
  margin = max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * total))
  if forced:
    if pixel_bytes > free:
      raise ValueError(
          f"--config.data.cache={value}: the {src.split!r} split needs "
          f"{_gb(pixel_bytes)} at {size} px, and {base} has {_gb(free)} "
          "free. Free space there, choose another directory, or use "
          "--config.data.cache=auto (caches only what fits) or none.")
    return Plan(directory, True, reason=f"--config.data.cache={value}",
                **common)
  if pixel_bytes + margin <= free:
    return Plan(directory, True, reason=(
        f"fits: {_gb(free)} free, keeping {_gb(margin)} free"), **common)
  return Plan(directory, False, reason=(
      f"{_gb(pixel_bytes)} at {size} px does not fit: {_gb(free)} free, "
      f"keeping {_gb(margin)} free"), **common)


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n < 1e11 else f"{n / 1e9:.0f} GB"


def describe(p: Plan, seconds: float) -> str:
  """The one log line: where the cache is, how big, and why on or off."""
  if p.directory is None:
    return (f"Pixel cache for {p.split!r} off ({p.reason}): records are read "
            "and decoded every epoch.")
  if p.pixels:
    return (f"Pixel cache for {p.split!r} on: {p.pixels_path}, "
            f"{p.num_examples} images x {p.size} px = {_gb(p.pixel_bytes)} "
            f"({p.reason}; ready in {seconds:.1f} s).")
  return (f"Pixel cache for {p.split!r} off ({p.reason}): JPEGs decode every "
          f"epoch from the record index {p.index_path} (ready in "
          f"{seconds:.1f} s); --config.data.cache=DIR puts the cache on a "
          "larger local disk.")


# --------------------------------------------------------------------------
# Building under a lock, via temporary files.
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(directory: str, name: str):
  """An exclusive flock on `directory/.name.lock` (freed by the kernel when
  the holder dies); also clears temporaries a killed build left behind."""
  os.makedirs(directory, exist_ok=True)
  lock_path = os.path.join(directory, f".{name}.lock")
  with open(lock_path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("Waiting for another process building %s/%s", directory,
                   name)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      for stale in glob.glob(os.path.join(directory, f".{name}.tmp-*")):
        os.remove(stale)  # Ours to clear: we hold the lock.
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _tmp_name(directory: str, name: str) -> str:
  return os.path.join(directory, f".{name}.tmp-{socket.gethostname()}-"
                      f"{os.getpid()}")


def _remove_stale_entries(base: str, directory: str, data_dir,
                          split: str) -> None:
  """Removes other keys' caches of the same split of the same prepared dir
  (its contents before it was prepared again)."""
  here = os.path.abspath(os.fspath(data_dir))
  for meta_path in glob.glob(os.path.join(base, "*", "meta.json")):
    entry = os.path.dirname(meta_path)
    if os.path.abspath(entry) == os.path.abspath(directory):
      continue
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      if (meta.get("data_dir"), meta.get("split")) != (here, split):
        continue
    except (OSError, ValueError):
      continue
    logging.info("Removing the stale pixel cache %s (%s was re-prepared)",
                 entry, here)
    shutil.rmtree(entry, ignore_errors=True)


def _write_meta(directory: str, data_dir, split: str) -> None:
  path = os.path.join(directory, "meta.json")
  if os.path.exists(path):
    return
  tmp = _tmp_name(directory, "meta.json")
  with open(tmp, "w") as f:
    json.dump({"data_dir": os.path.abspath(os.fspath(data_dir)),
               "split": split, "format": FORMAT_VERSION}, f)
  os.replace(tmp, path)


# --------------------------------------------------------------------------
# The record index: image bytes in place, labels.
# --------------------------------------------------------------------------
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


# ArrayRecord files are riegeli files: a 24-byte block header sits at every
# multiple of 64 KiB of the file, inside whatever record spans it; the rest
# of an uncompressed record's bytes lie in order.
RIEGELI_BLOCK = 1 << 16
RIEGELI_BLOCK_HEADER = 24


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


def _build_index(src: data.AffectNetSource, threads: int) -> RecordIndex:
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


def _labels_only(path, start, stop, src, out) -> None:
  """A shard not on a local file system: labels only (no offsets)."""
  del path
  for i, rec in zip(range(start, stop),
                    src.read_records(np.arange(start, stop))):
    _, out["expression"][i], out["valence"][i], out["arousal"][i] = (
        data.parse_training_fields(rec))


def _save_npz(path: str, arrays: dict) -> None:
  directory, name = os.path.split(path)
  tmp = _tmp_name(directory, name)
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def record_index(p: Plan, src: data.AffectNetSource, threads: int,
                 data_dir) -> RecordIndex:
  """The split's record index from the cache, built first if need be."""
  def load():
    with np.load(p.index_path) as z:
      index = RecordIndex(**{k: z[k] for k in RecordIndex.FIELDS})
    if len(index) != len(src):
      raise ValueError(f"{p.index_path} holds {len(index)} records, the "
                       f"split {len(src)}")
    return index

  if os.path.exists(p.index_path):
    return load()
  name = os.path.basename(p.index_path)
  with _locked(p.directory, name):
    if os.path.exists(p.index_path):  # Another process built it meanwhile.
      return load()
    _remove_stale_entries(os.path.dirname(p.directory), p.directory,
                          data_dir, p.split)
    _write_meta(p.directory, data_dir, p.split)
    index = _build_index(src, threads)
    _save_npz(p.index_path, {k: getattr(index, k) for k in RecordIndex.FIELDS})
  return index


# --------------------------------------------------------------------------
# Pixels.
# --------------------------------------------------------------------------
class PixelCache:
  """A split's decoded uint8 pixels (memory-mapped) and labels.

  `load(indices, batch, image)` is the batch loader of the input pipeline:
  the same dict of arrays the decoding loaders return, rows past
  `len(indices)` zero; `image` is the (batch, S, S, 3) buffer to gather
  into (a fresh one if None).
  """

  def __init__(self, pixels: np.ndarray, index: RecordIndex):
    self.pixels = pixels
    self.expression = index.expression
    self.valence = index.valence
    self.arousal = index.arousal

  def __len__(self) -> int:
    return len(self.pixels)

  def load(self, indices: np.ndarray, batch: int,
           image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    k = idx.size
    if k and (idx.min() < 0 or idx.max() >= len(self.pixels)):
      raise IndexError(f"index out of range for a cache of {len(self)} images")
    if image is None:
      image = np.empty((batch,) + self.pixels.shape[1:], np.uint8)
    # mode='clip' (the indices are checked above): numpy buffers `out` for
    # the default mode='raise', an extra copy of the batch.
    np.take(self.pixels, idx, axis=0, out=image[:k], mode="clip")
    image[k:] = 0
    out = {"image": image}
    for name in ("expression", "valence", "arousal"):
      col = getattr(self, name)
      out[name] = np.zeros((batch,), col.dtype)
      out[name][:k] = col[idx]
    return out


def _available_memory() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _open_pixels(path: str, shape: tuple) -> np.ndarray | None:
  """The pixel file memory-mapped read-only (None if absent or not `shape`).

  When it fits in half the available memory, the mapping is populated up
  front (`MAP_POPULATE`: read into the page cache and mapped in one pass),
  so batches never take a page fault.
  """
  try:
    header = np.load(path, mmap_mode="r")
  except (OSError, ValueError):
    return None
  if header.shape != shape or header.dtype != np.uint8:
    return None
  populate = getattr(mmap, "MAP_POPULATE", 0)
  if not populate or header.nbytes > _available_memory() // 2:
    return header
  with open(path, "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | populate,
                   prot=mmap.PROT_READ)
  return np.frombuffer(mm, np.uint8, count=header.size,
                       offset=header.offset).reshape(shape)


def pixels(p: Plan, index: RecordIndex,
           fill: Callable[[np.ndarray, np.ndarray], None],
           threads: int, chunk: int = 256) -> PixelCache:
  """The split's pixel cache, built first if need be.

  `fill(indices, out)` decodes the images at `indices` into the uint8
  array `out` (the input pipeline's own decoder); the build runs it on
  `threads` threads over chunks of `chunk` images.
  """
  shape = (p.num_examples, p.size, p.size, 3)
  cached = _open_pixels(p.pixels_path, shape)
  if cached is not None:
    return PixelCache(cached, index)
  name = os.path.basename(p.pixels_path)
  with _locked(p.directory, name):
    cached = _open_pixels(p.pixels_path, shape)
    if cached is None:
      tmp = _tmp_name(p.directory, name)
      out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                      shape=shape)

      def work(a: int) -> None:
        fill(np.arange(a, min(shape[0], a + chunk)), out[a:a + chunk])

      with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for job in [pool.submit(work, a) for a in range(0, shape[0], chunk)]:
          job.result()
      out.flush()
      del out
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
      os.replace(tmp, p.pixels_path)
      cached = _open_pixels(p.pixels_path, shape)
  return PixelCache(cached, index)
