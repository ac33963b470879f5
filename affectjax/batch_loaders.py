"""Batch loaders: a batch's source indices -> its uint8 images and labels.

The decode/gather stage of the input path (`read -> decode/gather ->
prefetch -> shard -> step`). Host reads, device computes: a loader gathers
or decodes each image into a row of a batch buffer and gathers its three
labels; every pixel op runs on the device (`affectjax.augment`). A loader's
`load(indices, batch, pools)` returns

  {"image": uint8 (batch, S, S, 3), "expression": int32 (batch,),
   "valence": float32 (batch,), "arousal": float32 (batch,)}

with rows past `len(indices)` zero, where S = `host_image_size(config,
manifest)`: the stored size, or a libjpeg DCT-scaled size (1/2, 1/4 or 1/8,
still >= `config.image_size`) when the stored JPEGs are at least twice as
large. Where the pixels come from (`--config.data.cache`,
`affectjax.pixel_cache`):

  cached   `_CachedRows`: the split decoded once at S into a memory-mapped
           uint8 file on this host; a batch is one `np.take` gather (no
           Python per image);
  index    `_IndexedRows`: the cache does not fit; each JPEG decodes straight
           from its bytes in the memory-mapped shard file (no record read,
           copy or parse), labels gathered from the record index;
  records  `_RecordRows`: no cache (`cache=none`, or no usable location):
           read, parse and decode the ArrayRecords.

All three deliver bit-identical batches (the cache is built by the same
decoder), so resuming, or changing the process count, never changes them.

`loader(config, src)` opens a split's loader once per process: the memory
maps, the record index and the one log line are kept by (data dir, cache
directory, size, pixels, decoder). Batch buffers are not: each stream owns
its `BufferPools`, released when its iterator closes.
"""
from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import simplejpeg
from absl import logging

from affectjax import data
from affectjax import pixel_cache
from affectjax import record_index

# The stored JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's fast DCT
# scaling, SIMD in libjpeg-turbo) when that still covers config.image_size.
_DCT_SCALES = (8, 4, 2)


def host_threads(config, *, cached: bool = False) -> int:
  """Host threads: `config.data.num_workers` if > 0, else by the cores.

  The cores are those this process may run on (`os.sched_getaffinity`), not
  the machine's, so a trainer pinned by a scheduler or `taskset` sizes to
  its share. Decoding gets two threads per core, because a thread spends
  part of each image holding the GIL (the per-image Python) or in a page
  fault; meanwhile its twin decodes. A cached split (`cached`) gets one per
  core: its batches are one GIL-free gather each, bound by memory
  bandwidth, and more threads only contend for it.
  """
  n = int(config.data.num_workers)
  if n > 0:
    return n
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    cores = os.cpu_count() or 1
  return max(1, cores if cached else 2 * cores)


def host_image_size(config, manifest: dict[str, Any]) -> int:
  """Side S of the host's uint8 batches for a prepared dir's manifest.

  The stored size, unless the images are JPEGs at least twice
  `config.image_size`: then the largest DCT scale 1/2, 1/4 or 1/8 whose
  output still is >= `config.image_size` (libjpeg rounds the scaled side
  up). The device resizes S to `config.image_size`.
  """
  stored = int(manifest["image_size"])
  if manifest.get("encoding") != "jpeg":
    return stored
  for d in _DCT_SCALES:
    scaled = -(-stored // d)
    if scaled >= int(config.image_size):
      return scaled
  return stored


@dataclasses.dataclass(frozen=True)
class _Decoder:
  """Decodes stored image bytes straight into rows of a batch buffer."""
  encoding: str
  stored_size: int
  size: int  # Side of the output rows (host_image_size).
  split: str

  @functools.cached_property
  def _jpeg_kwargs(self) -> dict[str, Any]:
    scale = {} if self.size == self.stored_size else {
        "min_height": self.size, "min_width": self.size}
    return {"colorspace": "RGB", "fastdct": data.JPEG_FAST_DCT, **scale}

  def into(self, image, out: np.ndarray, index: int) -> None:
    """Decodes `image` (bytes or a memoryview) into `out` (S, S, 3)."""
    if self.encoding == "raw":
      row = np.frombuffer(image, np.uint8)
      if row.size != out.size:
        raise ValueError(self._bad(index, f"{row.size} raw bytes, expected "
                                   f"{out.size}"))
      out.reshape(-1)[:] = row
      return
    try:
      img = simplejpeg.decode_jpeg(image, buffer=out, **self._jpeg_kwargs)
    except ValueError as e:  # Corrupt, or larger than the batch row.
      raise ValueError(self._bad(index, f"an image that does not decode to "
                                 f"{out.shape} ({e})")) from e
    if img.shape != out.shape:
      raise ValueError(self._bad(index, f"a {img.shape[1]}x{img.shape[0]} "
                                 f"JPEG decoding to {img.shape}, expected "
                                 f"{out.shape}"))

  def _bad(self, index: int, what: str) -> str:
    return (f"Record {index} of the {self.split!r} split holds {what}: every "
            f"image of a prepared dir must be {self.stored_size}x"
            f"{self.stored_size} (manifest image_size). Re-prepare the data "
            "with `python -m data_prep.affectnet`.")


def _decoder(config, src: data.AffectNetSource) -> _Decoder:
  return _Decoder(encoding=src.encoding, stored_size=src.image_size,
                  size=host_image_size(config, src.manifest), split=src.split)


# --------------------------------------------------------------------------
# Batch buffers.
# --------------------------------------------------------------------------
def _refcount(items: list, i: int) -> int:
  return sys.getrefcount(items[i])


class _ImageBuffers:
  """Batch image buffers of one shape, reused once nothing refers to them.

  A fresh (b, S, S, 3) buffer costs a page fault per 4 KiB page on its first
  write (the kernel zeroes each page): as much CPU as the gather from the
  pixel cache that fills it. A buffer is handed out again only when its
  reference count shows that no batch, view of it or array aliasing it is
  left: a CPU device uses suitably aligned host memory in place, and the
  `jax.Array` that `device_put` or `make_array_from_process_local_data`
  returns then holds a reference to the buffer itself. Buffers are base
  arrays (never views), so that reference lands on the object counted
  here. Past `limit` buffers in use, fresh ones are allocated as before.
  """

  def __init__(self, shape: tuple, limit: int = 64):
    self._shape, self._limit = tuple(shape), limit
    self._buffers: list[np.ndarray] = []
    self._lock = threading.Lock()
    self._idle = _refcount([np.empty(0)], 0)  # Held by the list alone.

  def get(self) -> np.ndarray:
    with self._lock:
      for i in range(len(self._buffers)):
        if _refcount(self._buffers, i) == self._idle:
          return self._buffers[i]
      buf = np.empty(self._shape, np.uint8)
      if len(self._buffers) < self._limit:
        self._buffers.append(buf)
      return buf


class BufferPools:
  """The image buffer pools of one stream of batches, by (batch, size).

  A train or eval dataset owns one (train and eval batches differ in size,
  and a stream's pool must not serve another's batches); `release()`, called
  when the stream's iterator closes, drops every pooled buffer, and later
  requests get fresh, unpooled ones (decode threads still finishing after a
  close).
  """

  def __init__(self):
    self._pools: dict[tuple[int, int], _ImageBuffers] = {}
    self._lock = threading.Lock()
    self.released = False

  def image(self, batch: int, size: int) -> np.ndarray:
    """A (batch, size, size, 3) uint8 buffer no live batch uses."""
    with self._lock:
      if self.released:
        return np.empty((batch, size, size, 3), np.uint8)
      pool = self._pools.get((batch, size))
      if pool is None:
        pool = self._pools[(batch, size)] = _ImageBuffers(
            (batch, size, size, 3))
    return pool.get()

  def release(self) -> None:
    with self._lock:
      self.released = True
      self._pools.clear()


def _image(pools: BufferPools | None, batch: int, size: int) -> np.ndarray:
  if pools is None:
    return np.empty((batch, size, size, 3), np.uint8)
  return pools.image(batch, size)


def _empty_batch(image: np.ndarray, batch: int) -> dict[str, np.ndarray]:
  return {"image": image,
          "expression": np.zeros((batch,), np.int32),
          "valence": np.zeros((batch,), np.float32),
          "arousal": np.zeros((batch,), np.float32)}


# --------------------------------------------------------------------------
# The three loaders.
# --------------------------------------------------------------------------
def _decode_records(src: data.AffectNetSource, decoder: _Decoder,
                    indices: np.ndarray, out: dict[str, np.ndarray],
                    rows: np.ndarray | None = None) -> None:
  """Reads, parses and decodes records `indices` into rows `rows` (default
  0..len-1) of the arrays in `out` (those of its keys that are present)."""
  records = src.read_records(indices)
  rows = range(len(indices)) if rows is None else rows.tolist()
  image = out["image"]
  labels = [out.get(k) for k in ("expression", "valence", "arousal")]
  for row, index, rec in zip(rows, indices.tolist(), records):
    try:
      img, *values = data.parse_training_fields(rec)
    except data.RecordError as e:
      raise data.RecordError(
          f"Record {index} of the {src.split!r} split ({src.paths}): {e}. "
          "Re-prepare the data with `python -m data_prep.affectnet`.") from e
    for col, value in zip(labels, values):
      if col is not None:
        col[row] = value
    decoder.into(img, image[row], index)


class _CachedRows:
  """Batches gathered from the pixel cache (`pixel_cache.PixelCache`)."""
  cached = True

  def __init__(self, cache: pixel_cache.PixelCache):
    self.cache = cache

  def load(self, indices: np.ndarray, batch: int,
           pools: BufferPools | None = None) -> dict[str, np.ndarray]:
    return self.cache.load(indices, batch, _image(
        pools, batch, self.cache.pixels.shape[1]))


class _RecordRows:
  """Batches straight from the ArrayRecords: read, parse, decode (no cache)."""
  cached = False

  def __init__(self, src: data.AffectNetSource, decoder: _Decoder):
    self._src, self._decoder = src, decoder

  def load(self, indices: np.ndarray, batch: int,
           pools: BufferPools | None = None) -> dict[str, np.ndarray]:
    out = _empty_batch(_image(pools, batch, self._decoder.size), batch)
    _decode_records(self._src, self._decoder, indices, out)
    out["image"][len(indices):] = 0
    return out


class _IndexedRows:
  """The JPEG path over a record index (`record_index.RecordIndex`).

  Each image decodes straight from its bytes in the memory-mapped shard
  file (a memoryview: no record read, no copy, no protobuf parse; one copy
  for the images that span a block header of the file); labels are
  gathered from the index. Images the index could not place are read as
  records.
  """
  cached = False

  def __init__(self, src: data.AffectNetSource, decoder: _Decoder,
               index: record_index.RecordIndex):
    self._src, self._decoder, self._index = src, decoder, index
    self._views = []
    for path in src.paths:
      if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb") as f:
          self._views.append(memoryview(mmap.mmap(
              f.fileno(), 0, access=mmap.ACCESS_READ)))
      else:  # Not a local file: read its records.
        self._views.append(None)
    mapped = np.array([v is not None for v in self._views], bool)
    self._offset = np.where(mapped[index.shard], index.offset, -1)
    self._whole = record_index.contiguous(index.offset, index.length).tolist()

  def fill(self, indices: np.ndarray, image: np.ndarray) -> None:
    """Decodes the images at `indices` into `image[:len(indices)]`."""
    ix = self._index
    offset = self._offset[indices]
    into, views, whole = self._decoder.into, self._views, self._whole
    for row, (s, o, n, i) in enumerate(zip(
        ix.shard[indices].tolist(), offset.tolist(),
        ix.length[indices].tolist(), indices.tolist())):
      if o < 0:
        continue
      if whole[i]:
        into(views[s][o:o + n], image[row], i)
      else:  # Spans a block header of the shard file.
        into(record_index.assemble(views[s], o, n), image[row], i)
    missing = np.flatnonzero(offset < 0)
    if missing.size:
      _decode_records(self._src, self._decoder, indices[missing],
                      {"image": image}, rows=missing)

  def load(self, indices: np.ndarray, batch: int,
           pools: BufferPools | None = None) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    out = _empty_batch(_image(pools, batch, self._decoder.size), batch)
    self.fill(idx, out["image"])
    out["image"][len(idx):] = 0
    for name in ("expression", "valence", "arousal"):
      out[name][:len(idx)] = getattr(self._index, name)[idx]
    return out


# --------------------------------------------------------------------------
# One loader per split per process.
# --------------------------------------------------------------------------
# Loaders this process opened, by (data dir, cache directory, host size,
# pixels, decoder): the cache directory is named by the data's checksums, so
# a split is opened, memory-mapped and logged once per process however often
# it is evaluated, and re-prepared data gets a new entry. The key leaves out
# the plan's reason, whose free-space figure changes from call to call.
# Uncached splits are not kept (a re-prepared dir is read as it is now);
# `_LOGGED` only remembers that their line was logged.
_LOADERS: dict[tuple, tuple[Any, record_index.RecordIndex]] = {}
_LOGGED: set[tuple] = set()
_LOADERS_LOCK = threading.Lock()


def loader(config, src: data.AffectNetSource):
  """(batch loader, record index or None) for `src` under `config.data.cache`.

  The loader is a `_CachedRows` (gather from the decoded pixels), an
  `_IndexedRows` (decode from the memory-mapped shards) or a `_RecordRows`
  (read, parse and decode records); all deliver identical batches.
  """
  decoder = _decoder(config, src)
  plan = pixel_cache.plan(config, src, decoder.size)
  key = (os.path.abspath(os.fspath(config.data.dir)), plan.directory,
         plan.size, plan.pixels, decoder)
  with _LOADERS_LOCK:
    if plan.directory is None:  # Nothing to reuse: read the data as it is.
      if key not in _LOGGED:
        logging.info(pixel_cache.describe(plan, 0.0))
        _LOGGED.add(key)
      return _RecordRows(src, decoder), None
    if key in _LOADERS:
      return _LOADERS[key]
    t = time.perf_counter()
    threads = host_threads(config)
    try:
      index = pixel_cache.record_index(plan, src, threads, config.data.dir)
      rows = _IndexedRows(src, decoder, index)
      if plan.pixels:
        loaded = _CachedRows(pixel_cache.pixels(plan, index, rows.fill,
                                                threads)), index
      else:
        loaded = rows, index
    except pixel_cache.LockUnavailable as e:
      # The probe in `plan` passed, but a build lock then failed: off.
      off = dataclasses.replace(plan, directory=None, pixels=False,
                                reason=e.strerror)
      logging.warning(pixel_cache.describe(off, 0.0))
      return _RecordRows(src, decoder), None
    logging.info(pixel_cache.describe(plan, time.perf_counter() - t))
    _LOADERS[key] = loaded
    return loaded


def forget() -> None:
  """Forgets the loaders this process opened and the cache decisions it
  holds, as a new process starts (for tests)."""
  with _LOADERS_LOCK:
    _LOADERS.clear()
    _LOGGED.clear()
  pixel_cache.release_decisions()
