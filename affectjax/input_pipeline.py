"""Host input path: ArrayRecord bytes -> uint8 batches, in threads; device prefetch.

Host reads, device computes: the host gathers or decodes each image into
a batch buffer and gathers its three labels; crops, resizes, flips and
every other pixel op run on the device (`affectjax.augment`). Batches are

  train: {"image": uint8 (b, S, S, 3), "expression": int32 (b,),
          "valence": float32 (b,), "arousal": float32 (b,)}
  eval:  the same plus "mask" (float32, 0 on padding rows) and "index"
         (int32 source index, -1 on padding)

where b is the per-process batch and S = `host_image_size(config, manifest)`:
the stored size, or a libjpeg DCT-scaled size (1/2, 1/4 or 1/8, still
>= `config.image_size`) when the stored JPEGs are at least twice as large.

Global batch contract. Training reads ONE seeded global order of source
indices (`ShuffleOrder`: a new permutation of the split per epoch, or
`BalancedOrder`: classes drawn by frequency**temperature); step k's global
batch is positions [k*B, (k+1)*B) of it, and process p of P delivers rows
[p*B/P, (p+1)*B/P). The global batch is therefore the same whatever the
number of processes or threads. Evaluation does the same over the split in
order, padded to whole global batches.

Where the pixels come from (`--config.data.cache`, `affectjax.pixel_cache`):
  cached   the split decoded once at S into a memory-mapped uint8 file on
           this host; a batch is one `np.take` gather (no Python per image);
  index    the cache does not fit: each JPEG decodes straight from its bytes
           in the memory-mapped shard file (no record read, copy or parse);
  records  `cache=none`: read, parse and decode the ArrayRecords.
All three deliver bit-identical batches (the cache is built by the same
decoder), so resuming, or changing the process count, never changes them.

Threads, not processes. Each batch is one element of a `grain.MapDataset`
(`__getitem__(k)` builds batch k); `to_iter_dataset` runs them on a pool of
threads. The gather and libjpeg-turbo's decode release the GIL, so threads
use the cores without worker processes, pickling, shared memory or
per-evaluation start-up, and nothing can outlive a killed trainer. What
holds the GIL per image is a few microseconds of Python around each decode
call (none on the cached path), so one process orchestrates far more images
per second than a GPU host consumes (docs/BENCHMARKS.md has the figures).
The iterator is Grain's, so its state (`{"next_index": k}`) goes into the
Orbax checkpoint via `grain.checkpoint.CheckpointSave`, and a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import mmap
import os
import sys
import threading
import time
from typing import Any, Iterator

import grain
import numpy as np
import simplejpeg
from absl import flags
from absl import logging

from affectjax import data
from affectjax import pixel_cache

# The stored JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's fast DCT
# scaling, SIMD in libjpeg-turbo) when that still covers config.image_size.
_DCT_SCALES = (8, 4, 2)


def _ensure_flags_parsed() -> None:
  """Grain reads absl flags; outside an absl app (tests, notebooks) nobody parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


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


# --------------------------------------------------------------------------
# Global orders: position in the stream -> source index, from the seed alone.
# --------------------------------------------------------------------------
class _LRU:
  """A tiny thread-safe memo for per-epoch/per-block arrays."""

  def __init__(self, size: int):
    self._size = size
    self._items = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key, make):
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    value = make()  # Outside the lock: two threads may both compute it.
    with self._lock:
      self._items[key] = value
      while len(self._items) > self._size:
        self._items.popitem(last=False)
    return value


class ShuffleOrder:
  """Epoch e is a fresh permutation of the split, seeded by (seed, e)."""

  def __init__(self, num_examples: int, seed: int):
    if num_examples <= 0:
      raise ValueError("ShuffleOrder needs at least one example.")
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self._perms = _LRU(4)

  def _perm(self, epoch: int) -> np.ndarray:
    return self._perms.get(epoch, lambda: np.random.default_rng(
        [self.seed, 0, epoch]).permutation(self.num_examples))

  def indices(self, start: int, stop: int) -> np.ndarray:
    """Source indices at global positions [start, stop)."""
    first, last = start // self.num_examples, (stop - 1) // self.num_examples
    if first == last:  # Within one epoch, as nearly every batch is.
      base = first * self.num_examples
      return self._perm(first)[start - base:stop - base].astype(np.int64)
    pos = np.arange(start, stop, dtype=np.int64)
    epoch, offset = np.divmod(pos, self.num_examples)
    out = np.empty_like(pos)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._perm(int(e))[offset[sel]]
    return out


class BalancedOrder:
  """Class-balanced order: each position draws a class, then an example of it.

  Classes are drawn i.i.d. with probability proportional to
  count**temperature (0 = every present class equally often, 1 = as in the
  data); within a class, examples come in a fresh permutation per pass over
  that class, so every example of a class is seen before any repeats.

  Random access from the seed: positions are grouped in blocks of
  `block_size`; block b's class draws are seeded by (seed, b), and an
  example's rank within its class comes from per-block class counts, which
  are accumulated once (about 1 ms per block) and kept.
  """

  def __init__(self, labels: np.ndarray, seed: int, temperature: float,
               num_classes: int, block_size: int = 1 << 16):
    labels = np.asarray(labels, np.int64)
    if labels.size == 0:
      raise ValueError("BalancedOrder needs at least one example.")
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"Expression labels must lie in [0, {num_classes}); "
                       f"found {labels.min()}..{labels.max()}. Check "
                       "--config.num_classes against the prepared data.")
    if temperature < 0:
      raise ValueError(f"--config.data.sampler_temperature={temperature} "
                       "must be >= 0 (0 = even classes, 1 = data frequency).")
    self.seed = int(seed)
    self.block_size = int(block_size)
    counts = np.bincount(labels, minlength=num_classes)
    self.classes = np.nonzero(counts)[0]
    weights = counts[self.classes].astype(np.float64) ** float(temperature)
    self.probs = weights / weights.sum()
    # Members of each present class, in source order.
    self._members = [np.nonzero(labels == c)[0] for c in self.classes]
    self._blocks = _LRU(4)
    self._perms = _LRU(64)
    self._prefix = [np.zeros(len(self.classes), np.int64)]  # Before block b.
    self._prefix_lock = threading.Lock()

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(class slot of each position in block b, its rank within the block)."""
    def make():
      rng = np.random.default_rng([self.seed, 1, b])
      slots = rng.choice(len(self.classes), size=self.block_size, p=self.probs)
      order = np.argsort(slots, kind="stable")
      counts = np.bincount(slots, minlength=len(self.classes))
      first = np.concatenate([[0], np.cumsum(counts)[:-1]])
      rank = np.empty(self.block_size, np.int64)
      rank[order] = np.arange(self.block_size) - np.repeat(first, counts)
      return slots, rank
    return self._blocks.get(b, make)

  def _prefix_counts(self, b: int) -> np.ndarray:
    with self._prefix_lock:
      while len(self._prefix) <= b:
        k = len(self._prefix) - 1
        slots = np.random.default_rng([self.seed, 1, k]).choice(
            len(self.classes), size=self.block_size, p=self.probs)
        self._prefix.append(self._prefix[-1] + np.bincount(
            slots, minlength=len(self.classes)))
      return self._prefix[b]

  def _member(self, slot: int, occurrence: np.ndarray) -> np.ndarray:
    members = self._members[slot]
    n = len(members)
    rounds, pos = np.divmod(occurrence, n)
    out = np.empty_like(occurrence)
    for r in np.unique(rounds):
      perm = self._perms.get((slot, int(r)), lambda: np.random.default_rng(
          [self.seed, 2, int(self.classes[slot]), int(r)]).permutation(n))
      sel = rounds == r
      out[sel] = members[perm[pos[sel]]]
    return out

  def indices(self, start: int, stop: int) -> np.ndarray:
    """Source indices at global positions [start, stop)."""
    pos = np.arange(start, stop, dtype=np.int64)
    block, offset = np.divmod(pos, self.block_size)
    out = np.empty_like(pos)
    for b in np.unique(block):
      sel = np.nonzero(block == b)[0]
      slots, rank = self._block(int(b))
      s, r = slots[offset[sel]], rank[offset[sel]]
      occurrence = self._prefix_counts(int(b))[s] + r
      for slot in np.unique(s):
        m = s == slot
        out[sel[m]] = self._member(int(slot), occurrence[m])
    return out


def train_order(config, src: data.AffectNetSource,
                labels: np.ndarray | None = None):
  """The global training order `config.data.sampler` asks for.

  `labels`: the split's expression labels if already known (the record
  index holds them); else the balanced sampler reads them from the records.
  """
  sampler = config.data.sampler
  if sampler == "shuffle":
    return ShuffleOrder(len(src), config.seed)
  if sampler == "balanced":
    return BalancedOrder(src.labels() if labels is None else labels,
                         config.seed,
                         float(config.data.sampler_temperature),
                         int(config.num_classes))
  raise ValueError(f"--config.data.sampler={sampler!r}; use 'shuffle' or "
                   "'balanced'.")


# --------------------------------------------------------------------------
# Batches.
# --------------------------------------------------------------------------
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


def _refcount(items: list, i: int) -> int:
  return sys.getrefcount(items[i])


class _ImageBuffers:
  """Batch image buffers of one shape, reused once nothing refers to them.

  A fresh (b, S, S, 3) buffer costs a page fault per 4 KiB page on its first
  write (the kernel zeroes each page): as much CPU as the gather from the
  pixel cache that fills it. A buffer is handed out again only when its
  reference count shows that no batch, view of it or array aliasing it (a
  CPU device may use host memory in place) is left; past `limit` buffers
  in use, fresh ones are allocated as before.
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


def _empty_batch(buffers: _ImageBuffers, batch: int) -> dict[str, np.ndarray]:
  return {"image": buffers.get(),
          "expression": np.zeros((batch,), np.int32),
          "valence": np.zeros((batch,), np.float32),
          "arousal": np.zeros((batch,), np.float32)}


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


def _buffers(pools: dict, batch: int, size: int) -> _ImageBuffers:
  """The buffer pool for (batch, size) in `pools` (train and eval differ)."""
  key = (batch, size)
  if key not in pools:
    pools.setdefault(key, _ImageBuffers((batch, size, size, 3)))
  return pools[key]


class _CachedRows:
  """Batches gathered from the pixel cache (`pixel_cache.PixelCache`)."""

  def __init__(self, cache: pixel_cache.PixelCache):
    self.cache = cache
    self._buffers = {}

  def load(self, indices: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    return self.cache.load(indices, batch, _buffers(
        self._buffers, batch, self.cache.pixels.shape[1]).get())


class _RecordRows:
  """Batches straight from the ArrayRecords: read, parse, decode (no cache)."""

  def __init__(self, src: data.AffectNetSource, decoder: _Decoder):
    self._src, self._decoder = src, decoder
    self._buffers = {}

  def load(self, indices: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    out = _empty_batch(_buffers(self._buffers, batch, self._decoder.size),
                       batch)
    _decode_records(self._src, self._decoder, indices, out)
    out["image"][len(indices):] = 0
    return out


class _IndexedRows:
  """The JPEG path over a record index (`pixel_cache.RecordIndex`).

  Each image decodes straight from its bytes in the memory-mapped shard
  file (a memoryview: no record read, no copy, no protobuf parse; one copy
  for the images that span a block header of the file); labels are
  gathered from the index. Images the index could not place are read as
  records.
  """

  def __init__(self, src: data.AffectNetSource, decoder: _Decoder,
               index: pixel_cache.RecordIndex):
    self._src, self._decoder, self._index = src, decoder, index
    self._buffers = {}
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
    self._whole = pixel_cache.contiguous(index.offset, index.length).tolist()

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
        into(pixel_cache.assemble(views[s], o, n), image[row], i)
    missing = np.flatnonzero(offset < 0)
    if missing.size:
      _decode_records(self._src, self._decoder, indices[missing],
                      {"image": image}, rows=missing)

  def load(self, indices: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    out = _empty_batch(_buffers(self._buffers, batch, self._decoder.size),
                       batch)
    self.fill(idx, out["image"])
    out["image"][len(idx):] = 0
    for name in ("expression", "valence", "arousal"):
      out[name][:len(idx)] = getattr(self._index, name)[idx]
    return out


class _TrainBatches(grain.MapDataset):
  """Element k = this process's rows of global batch k (infinite)."""

  def __init__(self, rows, order, global_batch: int, process_index: int,
               process_count: int):
    super().__init__()
    self._rows, self._order = rows, order
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, k):
    if not isinstance(k, int):
      return self.slice(k)
    start = k * self._global + self._offset
    idx = self._order.indices(start, start + self._local)
    return self._rows.load(idx, self._local)

  def __str__(self) -> str:
    return f"_TrainBatches(local={self._local}, global={self._global})"


class _EvalBatches(grain.MapDataset):
  """Element k = this process's rows of padded global batch k of the split."""

  def __init__(self, rows, num_examples: int, global_batch: int,
               process_index: int, process_count: int):
    super().__init__()
    self._rows = rows
    self._n = num_examples
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._num_batches = eval_num_batches(self._n, global_batch)

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, k):
    if not isinstance(k, int):
      return self.slice(k)
    g = k * self._global + self._offset + np.arange(self._local)
    real = g < self._n
    out = self._rows.load(g[real], self._local)
    out["mask"] = real.astype(np.float32)
    out["index"] = np.where(real, g, -1).astype(np.int32)
    return out

  def __str__(self) -> str:
    return f"_EvalBatches(local={self._local}, batches={self._num_batches})"


def _decoder(config, src: data.AffectNetSource) -> _Decoder:
  return _Decoder(encoding=src.encoding, stored_size=src.image_size,
                  size=host_image_size(config, src.manifest), split=src.split)


# Batch loaders already opened by this process, by cache plan (whose
# directory is named by the data's checksums): evaluation opens its split's
# cache once, not at every evaluation, and logs once. Uncached plans only
# remember that they were logged.
_LOADERS: dict[Any, tuple[Any, Any] | None] = {}
_LOADERS_LOCK = threading.Lock()


def _loader(config, src: data.AffectNetSource):
  """(batch loader, record index or None) for `src` under `config.data.cache`.

  The loader is a `_CachedRows` (gather from the decoded pixels), an
  `_IndexedRows` (decode from the memory-mapped shards) or a `_RecordRows`
  (read, parse and decode records); all deliver identical batches.
  """
  decoder = _decoder(config, src)
  plan = pixel_cache.plan(config, src, decoder.size)
  key = (plan, os.path.abspath(os.fspath(config.data.dir)), decoder)
  with _LOADERS_LOCK:
    if plan.directory is None:  # Nothing to reuse: read the data as it is.
      if key not in _LOADERS:
        logging.info(pixel_cache.describe(plan, 0.0))
        _LOADERS[key] = None
      return _RecordRows(src, decoder), None
    if key in _LOADERS:  # The key holds the data's checksums.
      return _LOADERS[key]
    t = time.perf_counter()
    threads = host_threads(config)
    index = pixel_cache.record_index(plan, src, threads, config.data.dir)
    rows = _IndexedRows(src, decoder, index)
    if plan.pixels:
      loaded = _CachedRows(pixel_cache.pixels(plan, index, rows.fill,
                                              threads)), index
    else:
      loaded = rows, index
    logging.info(pixel_cache.describe(plan, time.perf_counter() - t))
    _LOADERS[key] = loaded
    return loaded


def _threaded(ds: grain.MapDataset, config, rows) -> grain.IterDataset:
  threads = host_threads(
      config, cached=isinstance(rows, _CachedRows))
  buffer = max(int(config.data.prefetch_buffer_size), threads)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=buffer))


def _check_split(process_index: int, process_count: int, local: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside "
                     f"[0, process_count={process_count}).")
  if local <= 0:
    raise ValueError(f"local_batch_size={local} must be positive.")


def train_dataset(config, *, local_batch_size: int, process_index: int = 0,
                  process_count: int = 1, order=None,
                  manifest: dict | None = None) -> grain.IterDataset:
  """The infinite training stream of this process's uint8 batches.

  Args:
    config: the run config (data.dir, data.sampler, seed, image_size, ...).
    local_batch_size: rows per process; the global batch is
      local_batch_size * process_count.
    process_index, process_count: this process's slice of every global batch.
    order: optional prebuilt `ShuffleOrder`/`BalancedOrder` (else built
      from the config; the balanced one reads every label once).
    manifest: the data dir's manifest, if the caller has read it already.
  """
  _ensure_flags_parsed()
  _check_split(process_index, process_count, local_batch_size)
  src = data.source(config.data.dir, "train", manifest)
  global_batch = local_batch_size * process_count
  if len(src) < global_batch:
    raise ValueError(
        f"The training split of {config.data.dir} has {len(src)} examples, "
        f"fewer than one global batch (--config.batch_size={global_batch}); "
        "lower the batch size or prepare more data.")
  rows, index = _loader(config, src)
  if order is None:
    order = train_order(config, src,
                        labels=None if index is None else index.expression)
  ds = _TrainBatches(rows, order, global_batch, process_index, process_count)
  return _threaded(ds, config, rows)


def eval_num_batches(num_examples: int, global_batch: int) -> int:
  return max(1, math.ceil(num_examples / global_batch))


def eval_dataset(config, *, split: str = "val", local_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 manifest: dict | None = None
                 ) -> tuple[grain.IterDataset, int]:
  """One pass over ``split`` in padded global batches; returns (ds, num_examples).

  Each global batch ``b`` holds examples ``[b*B, (b+1)*B)``; process ``p``
  feeds rows ``[p*B/P, (p+1)*B/P)`` of it, so concatenating the gathered
  global batches recovers the split in order. Padding rows have ``mask`` 0,
  ``index`` -1 and zeros elsewhere. ``manifest``: the data dir's manifest,
  if the caller has read it already.
  """
  _ensure_flags_parsed()
  _check_split(process_index, process_count, local_batch_size)
  src = data.source(config.data.dir, split, manifest)
  rows, _ = _loader(config, src)
  ds = _EvalBatches(rows, len(src), local_batch_size * process_count,
                    process_index, process_count)
  return _threaded(ds, config, rows), len(src)


def iterate(ds: grain.IterDataset) -> Iterator[dict]:
  """Iterates ``ds`` and closes its iterator (and decode threads) afterwards."""
  it = iter(ds)
  try:
    yield from it
  finally:
    it.close()


# --------------------------------------------------------------------------
# Device prefetch.
# --------------------------------------------------------------------------
class DevicePrefetch(grain.DatasetIterator):
  """Keeps the next `depth` global batches on the devices ahead of the step.

  Wraps a host iterator of per-process batches; `next()` returns global
  `jax.Array`s sharded over the mesh (`sharding.shard_batch`). The transfer
  of batch k+1 is started (asynchronously) before batch k is returned, so it
  overlaps step k; nothing here waits on the device.

  Checkpointing: pass this iterator to `CheckpointSave`/`CheckpointRestore`
  like any Grain iterator. `get_state()` is the host iterator's state
  *before* the oldest batch still buffered here, i.e. the position of the
  next batch the trainer will get, so batches in flight are not skipped on
  resume; `set_state()` drops the buffer.

  `wait_seconds` accumulates the time `next()` spent blocked on the host
  pipeline (the trainer's input-wait time): log its delta per interval.
  """

  def __init__(self, host_iterator: grain.DatasetIterator, mesh, *,
               depth: int = 1):
    super().__init__(host_iterator)
    from affectjax import sharding  # pylint: disable=g-import-not-at-top
    self._host = host_iterator
    self._shard = lambda b: sharding.shard_batch(b, mesh)
    self._depth = max(1, int(depth))
    self._buffer = collections.deque()  # (host state before it, device batch)
    self.wait_seconds = 0.0

  def _fill(self) -> None:
    while len(self._buffer) < self._depth:
      state = self._host.get_state()
      t = time.perf_counter()
      host_batch = next(self._host)
      self.wait_seconds += time.perf_counter() - t
      self._buffer.append((state, self._shard(host_batch)))

  def __next__(self):
    self._assert_not_closed()
    self._fill()
    _, batch = self._buffer.popleft()
    self._fill()  # Start the next transfer before the step runs.
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._buffer:
      return self._buffer[0][0]
    return self._host.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._buffer.clear()
    self._host.set_state(state)

  def close(self) -> None:
    self._buffer.clear()
    self._host.close()
    super().close()

  def __str__(self) -> str:
    return f"DevicePrefetch(depth={self._depth})"
