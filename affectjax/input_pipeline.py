"""Host input path: train and eval datasets of per-process uint8 batches.

The input path reads straight through, one module per stage:

  read           `affectjax.data.source` (ArrayRecord shards), the record
                 index and pixel cache (`affectjax.record_index`,
                 `affectjax.pixel_cache`)
  decode/gather  `affectjax.batch_loaders`: source indices -> a batch
  prefetch       this module: batch k of a Grain `MapDataset`, built on a
                 pool of threads ahead of the trainer
  shard          `affectjax.device_prefetch`: global `jax.Array`s on the
                 mesh, one batch ahead of the step
  step           `affectjax.train`

Batches are

  train: {"image": uint8 (b, S, S, 3), "expression": int32 (b,),
          "valence": float32 (b,), "arousal": float32 (b,)}
  eval:  the same plus "mask" (float32, 0 on padding rows) and "index"
         (int32 source index, -1 on padding)

where b is the per-process batch and S = `batch_loaders.host_image_size`.

Global batch contract. Training reads ONE seeded global order of source
indices (`affectjax.sampling`); step k's global batch is positions
[k*B, (k+1)*B) of it, and process p of P delivers rows [p*B/P, (p+1)*B/P).
The global batch is therefore the same whatever the number of processes or
threads, and whether or not the pixels are cached. Evaluation does the same
over the split in order, padded to whole global batches.

Threads, not processes. Each batch is one element of a `grain.MapDataset`
(`__getitem__(k)` builds batch k); `to_iter_dataset` runs them on a pool of
threads. The gather and libjpeg-turbo's decode release the GIL, so threads
use the cores without worker processes, pickling, shared memory or
per-evaluation start-up, and nothing can outlive a killed trainer. What
holds the GIL per image is a few microseconds of Python around each decode
call (none on the cached path), so one process orchestrates far more images
per second than a GPU host consumes (docs/BENCHMARKS.md has the figures).

Resuming. The iterator is Grain's; its state (`{"next_index": k}`, the next
global batch) is what `affectjax.checkpoint` stores as the JSON `position`
item of a checkpoint, so a resumed run, on any process count, sees exactly
the batches an uninterrupted one would. Closing an iterator stops its
threads and releases its batch buffers (`batch_loaders.BufferPools`).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Iterator

import grain
import numpy as np
from absl import flags

from affectjax import batch_loaders
from affectjax import data
from affectjax import sampling


def _ensure_flags_parsed() -> None:
  """Grain reads absl flags; outside an absl app (tests, notebooks) nobody parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _TrainBatches(grain.MapDataset):
  """Element k = this process's rows of global batch k (infinite)."""

  def __init__(self, rows, order, global_batch: int, process_index: int,
               process_count: int, pools: batch_loaders.BufferPools):
    super().__init__()
    self._rows, self._order, self._pools = rows, order, pools
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
    return self._rows.load(idx, self._local, self._pools)

  def __str__(self) -> str:
    return f"_TrainBatches(local={self._local}, global={self._global})"


class _EvalBatches(grain.MapDataset):
  """Element k = this process's rows of padded global batch k of the split."""

  def __init__(self, rows, num_examples: int, global_batch: int,
               process_index: int, process_count: int,
               pools: batch_loaders.BufferPools):
    super().__init__()
    self._rows, self._pools = rows, pools
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
    out = self._rows.load(g[real], self._local, self._pools)
    out["mask"] = real.astype(np.float32)
    out["index"] = np.where(real, g, -1).astype(np.int32)
    return out

  def __str__(self) -> str:
    return f"_EvalBatches(local={self._local}, batches={self._num_batches})"


class _Threaded(grain.IterDataset):
  """The batches built on a pool of threads (`to_iter_dataset`); closing an
  iterator also releases the stream's batch buffers."""

  def __init__(self, batches: grain.MapDataset, threads: int, buffer: int,
               pools: batch_loaders.BufferPools):
    super().__init__(batches.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=buffer)))
    self.pools = pools

  def __iter__(self) -> grain.DatasetIterator:
    return _ReleasingIterator(self._parent.__iter__(), self.pools)

  def __str__(self) -> str:
    return "_Threaded"


class _ReleasingIterator(grain.DatasetIterator):
  """Grain's threaded iterator, whose `close()` also releases the pools."""

  def __init__(self, parent: grain.DatasetIterator,
               pools: batch_loaders.BufferPools):
    super().__init__(parent)
    self._pools = pools

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    super().close()  # Closes the parent: its threads stop.
    self._pools.release()

  def __str__(self) -> str:
    return "_ReleasingIterator"


def _threaded(ds: grain.MapDataset, config, rows,
              pools: batch_loaders.BufferPools) -> grain.IterDataset:
  threads = batch_loaders.host_threads(config, cached=rows.cached)
  buffer = max(int(config.data.prefetch_buffer_size), threads)
  return _Threaded(ds, threads, buffer, pools)


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
    order: optional prebuilt `sampling.ShuffleOrder`/`BalancedOrder` (else
      built from the config; the balanced one reads every label once).
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
  rows, index = batch_loaders.loader(config, src)
  if order is None:
    order = sampling.train_order(
        config, src, labels=None if index is None else index.expression)
  pools = batch_loaders.BufferPools()
  ds = _TrainBatches(rows, order, global_batch, process_index, process_count,
                     pools)
  return _threaded(ds, config, rows, pools)


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
  rows, _ = batch_loaders.loader(config, src)
  pools = batch_loaders.BufferPools()
  ds = _EvalBatches(rows, len(src), local_batch_size * process_count,
                    process_index, process_count, pools)
  return _threaded(ds, config, rows, pools), len(src)


def iterate(ds: grain.IterDataset) -> Iterator[dict]:
  """Iterates ``ds`` and closes its iterator (and decode threads) afterwards."""
  it = iter(ds)
  try:
    yield from it
  finally:
    it.close()
