"""Grain input pipelines: shuffled, augmented training batches; exact eval.

Images stay uint8 all the way to the device: the backbone's normalization is
the first op of the compiled step (``model.preprocess``), so hosts move 4x
fewer bytes and the workers do no float math.

Training: ``source -> shuffle(seed) -> repeat -> [process::process_count] ->
random_map(augment) -> batch(drop_remainder) -> mp_prefetch``. Shuffle and the
per-example augmentation RNG derive from the seed and the element index, so
the stream is the same whatever the number of workers, and it resumes exactly
from a checkpointed iterator state.

Evaluation: every validation example exactly once. The split is padded up to
a whole number of global batches; padding rows copy example 0 and carry
``mask == 0`` so metrics ignore them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import grain
import numpy as np
from absl import flags
from PIL import Image

from affectjax import data


def _ensure_flags_parsed() -> None:
  """Grain reads absl flags; outside an absl app (tests, notebooks) nobody parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Grain workers re-import ``__main__``; absl flags there must count as parsed."""
  del worker_index, worker_count
  _ensure_flags_parsed()


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """Random resized crop + horizontal flip, to ``size`` x ``size`` uint8.

  The crop covers ``scale`` of the image area with an aspect ratio in
  ``ratio`` (log-uniform), like Inception/ImageNet training but with a mild
  default range: faces are already tightly cropped, and cutting away the mouth
  or eyes would destroy the label. Landmarks, if a user needs them, are not
  transformed here and so are dropped from the batch.
  """
  size: int
  scale: tuple[float, float] = (0.8, 1.0)
  ratio: tuple[float, float] = (0.9, 1.1)
  flip: bool = True

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"]
    h, w = image.shape[:2]
    area = h * w * rng.uniform(*self.scale)
    log_r = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
    aspect = math.exp(log_r)
    cw = min(w, max(1, int(round(math.sqrt(area * aspect)))))
    ch = min(h, max(1, int(round(math.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    full = (cw, ch) == (w, h)
    out = _resize(image, self.size, box=None if full else
                  (x0, y0, x0 + cw, y0 + ch))
    if self.flip and rng.random() < 0.5:
      out = out[:, ::-1]
    return _example(element, out)


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
  """Deterministic full-image resize for evaluation."""
  size: int

  def map(self, element: dict) -> dict:
    return _example(element, _resize(element["image"], self.size))


def _resize(image: np.ndarray, size: int, box=None) -> np.ndarray:
  h, w = image.shape[:2]
  if box is None and h == size and w == size:
    return image
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((size, size), Image.BILINEAR, box=box))


def _example(element: dict, image: np.ndarray) -> dict:
  """The fields that go to the device; strings and landmarks stay behind."""
  return {
      "image": np.ascontiguousarray(image, dtype=np.uint8),
      "expression": np.int32(element["expression"]),
      "valence": np.float32(element["valence"]),
      "arousal": np.float32(element["arousal"]),
  }


def _mp_options(num_workers: int, buffer_size: int):
  _ensure_flags_parsed()
  return grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=max(1, buffer_size))


def train_dataset(config, *, local_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The infinite, per-process training stream of uint8 batches."""
  src = data.source(config.data.dir, "train")
  if len(src) < local_batch_size * process_count:
    raise ValueError(
        f"The training split of {config.data.dir} has {len(src)} examples, "
        f"fewer than one global batch (--config.batch_size="
        f"{local_batch_size * process_count}); lower the batch size or "
        "prepare more data.")
  ds = grain.MapDataset.source(src).shuffle(seed=config.seed).repeat()
  ds = ds[process_index::process_count]
  aug = Augment(size=config.image_size,
                scale=tuple(config.augment.crop_scale),
                ratio=tuple(config.augment.aspect_ratio),
                flip=bool(config.augment.flip))
  ds = ds.random_map(aug, seed=config.seed + 1)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.to_iter_dataset()
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(
        _mp_options(config.data.num_workers, config.data.prefetch_buffer_size),
        worker_init_fn=_worker_init)
  return ds


@dataclasses.dataclass(frozen=True)
class _PaddedEvalIndex(grain.transforms.Map):
  """Maps this process's position in the padded order to (source index, mask)."""
  num_examples: int
  global_batch: int
  process_index: int
  process_count: int

  def map(self, i: int) -> tuple[int, bool]:
    local = self.global_batch // self.process_count
    batch, offset = divmod(int(i), local)
    g = batch * self.global_batch + self.process_index * local + offset
    return (g, True) if g < self.num_examples else (0, False)


@dataclasses.dataclass(frozen=True)
class _LoadMasked(grain.transforms.Map):
  src: object
  size: int

  def map(self, index_and_mask) -> dict:
    index, real = index_and_mask
    element = self.src[index]
    ex = _example(element, _resize(element["image"], self.size))
    ex["mask"] = np.float32(real)
    ex["index"] = np.int32(index if real else -1)
    return ex


def eval_num_batches(num_examples: int, global_batch: int) -> int:
  return max(1, math.ceil(num_examples / global_batch))


def eval_dataset(config, *, split: str = "val", local_batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> tuple[grain.IterDataset, int]:
  """One pass over ``split`` in padded global batches; returns (ds, num_examples).

  Each global batch ``b`` holds examples ``[b*B, (b+1)*B)``; process ``p``
  feeds rows ``[p*B/P, (p+1)*B/P)`` of it, so concatenating the gathered
  global batches recovers the split in order.
  """
  src = data.source(config.data.dir, split)
  n = len(src)
  global_batch = local_batch_size * process_count
  num_batches = eval_num_batches(n, global_batch)
  ds = grain.MapDataset.range(num_batches * local_batch_size)
  ds = ds.map(_PaddedEvalIndex(n, global_batch, process_index, process_count))
  ds = ds.map(_LoadMasked(src, config.image_size))
  ds = ds.batch(local_batch_size, drop_remainder=False)
  ds = ds.to_iter_dataset()
  if config.data.eval_num_workers > 0:
    ds = ds.mp_prefetch(
        _mp_options(config.data.eval_num_workers,
                    config.data.prefetch_buffer_size),
        worker_init_fn=_worker_init)
  return ds, n


def iterate(ds: grain.IterDataset) -> Iterator[dict]:
  """Iterates ``ds`` and closes worker processes afterwards."""
  it = iter(ds)
  try:
    yield from it
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
