"""Image augmentation and resizing on the device, inside the jitted steps.

The host only reads and decodes: batches arrive as uint8 (B, S, S, 3) at the
prepared (or DCT-scaled) size S. These functions turn them into float32
(B, size, size, 3) images in [0, 255], which `model.preprocess` normalizes.

Contract (shared by the trainer, evaluation, prediction and export):
  resize_images(images, size) -> float32     deterministic, for eval/predict
  train_images(images, *, key, step, augment, size) -> float32
      random per image; the randomness of global row r at `step` is
      fold_in(fold_in(key, step), r), so it does not depend on the number of
      devices or processes, and a resumed run sees the same augmentation.

STUB: the real random resized crop / flip / colour / erasing / affine ops are
being written; until then train_images only resizes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_images(images: jax.Array, size: int) -> jax.Array:
  """Full-image bilinear resize of a uint8/float batch to float32 (B, size, size, 3)."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")


def train_images(images: jax.Array, *, key: jax.Array, step: jax.Array,
                 augment, size: int) -> jax.Array:
  """Training augmentation of a global batch (see the module docstring)."""
  del key, step, augment
  return resize_images(images, size)
