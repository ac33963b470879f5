"""Global sampling orders: a position in the training stream -> a source index.

Training reads ONE seeded global order of source indices, computed from the
seed alone with random access (any position, any process, in any order):
`ShuffleOrder` (a new permutation of the split per epoch) or `BalancedOrder`
(classes drawn by frequency**temperature). Step k's global batch is
positions [k*B, (k+1)*B) of it (`affectjax.input_pipeline`), so the global
batch does not depend on the number of processes or threads, and a resumed
run continues the same order.
"""
from __future__ import annotations

import collections
import threading

import numpy as np

from affectjax import data


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
