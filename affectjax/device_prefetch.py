"""Device prefetch: the next global batch on the devices while a step runs.

The last stage of the input path (`read -> decode/gather -> prefetch ->
shard -> step`): the host's per-process uint8 batches
(`affectjax.input_pipeline`) become global `jax.Array`s sharded over the
mesh (`affectjax.sharding.shard_batch`), one batch ahead of the step.
"""
from __future__ import annotations

import collections
import time
from typing import Any

import grain

from affectjax import sharding


class DevicePrefetch(grain.DatasetIterator):
  """Keeps the next `depth` global batches on the devices ahead of the step.

  Wraps a host iterator of per-process batches; `next()` returns global
  `jax.Array`s sharded over the mesh (`sharding.shard_batch`). The transfer
  of batch k+1 is started (asynchronously) before batch k is returned, so it
  overlaps step k; nothing here waits on the device.

  Checkpointing: `affectjax.checkpoint` stores `get_state()` as the run's
  data position (a JSON `position` item of the checkpoint) and restores it
  with `set_state()`. `get_state()` is the host iterator's state *before*
  the oldest batch still buffered here, i.e. the position of the next batch
  the trainer will get, so batches in flight are not skipped on resume;
  `set_state()` drops the buffer.

  `wait_seconds` accumulates the time `next()` spent blocked on the host
  pipeline (the trainer's input-wait time): log its delta per interval.
  """

  def __init__(self, host_iterator: grain.DatasetIterator, mesh, *,
               depth: int = 1):
    super().__init__(host_iterator)
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
