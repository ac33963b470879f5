"""Image augmentation and resizing on the device, inside the jitted steps.

The host only reads and decodes: batches arrive as uint8 (B, S, S, 3) at the
prepared size S (any S; normally S >= size). These functions turn them into
float32 (B, size, size, 3) images in [0, 255], which `model.preprocess`
normalizes. Pixel math runs batched in the compiled step (DESIGN.md, "host
reads, device computes"), where it costs little next to the model.

Contract (shared by the trainer, evaluation, prediction and export):
  resize_images(images, size) -> float32     deterministic, for eval/predict
  crop_batch(images, box) -> float32         one box of every (square) image,
                                             resampled to its size (test-time crops)
  train_images(images, *, key, step, augment, size) -> float32
      random per image; the randomness of global row r at `step` is
      fold_in(fold_in(key, step), r), so it does not depend on the number of
      devices or processes (the batch may be sharded over a ("data",) mesh),
      and a resumed run sees the same augmentation as an uninterrupted one.

`train_images` applies, per image and in this order:
  1. Random resized crop (always; `augment.crop_scale` = (1, 1) and
     `augment.aspect_ratio` = (1, 1) make it a plain resize). The crop covers a
     fraction U(crop_scale) of the image area with a log-uniform aspect ratio
     (width / height) in `aspect_ratio`, clamped to the image, at a uniform
     position, with continuous (sub-pixel) box edges. It is resampled to `size` with `jax.image.scale_and_translate`
     (triangle kernel, antialiased when shrinking: the same filter as Pillow's
     BILINEAR resize with a box).
  2. Horizontal flip with probability 1/2 (`augment.flip`).
  3. Small affine (`augment.rotate_degrees`, `augment.translate`): rotation by
     U(-deg, deg) about the centre and a shift of U(-t, t) * size per axis,
     bilinear, borders filled by mirroring (scipy's 'mirror' mode, OpenCV's
     BORDER_REFLECT_101). Scale comes from the crop. Skipped when both are 0.
  4. Colour jitter (`augment.color_jitter` = j): brightness, contrast and
     saturation factors each U(max(0, 1-j), 1+j), applied in that fixed order
     with Pillow's ImageEnhance formulas (contrast around the mean grey level,
     saturation towards the ITU-R 601 luma grey image), clipped to [0, 255]
     after each. torchvision shuffles the order per image; a fixed order keeps
     the op a pure function of its three factors. Skipped when j == 0.
  5. Random erasing (`augment.erasing_prob`), timm's `RandomErasing` with
     mode='pixel': with that probability, up to 10 attempts to draw a
     rectangle of area U(0.02, 1/3) of the image and log-uniform aspect ratio
     in (0.3, 1/0.3) that fits; the first that fits is filled with per-pixel
     Gaussian noise of ImageNet's mean and std (`models.preprocessing`'s, in
     pixel units, clipped to [0, 255]), which is timm's N(0, 1) after
     normalization. If none fits,
     nothing is erased (as in timm). Skipped when the probability is 0.

Each op reads its own fixed slots of one uniform vector drawn per row (plus,
for erasing, a noise image from fold_in(row key, 1)), so turning one op on or
off never changes what the others draw.

Resampling is separable matrix products (`scale_and_translate`), a gather for
the affine and elementwise math for the rest: at batch 64, 320 -> 300 px the
crop is about 11 GMACs per step, small next to any of the models.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from affectjax.models import preprocessing

# ImageNet statistics in pixel units: the fill of random erasing.
_MEAN_RGB = np.array(preprocessing.IMAGENET_MEAN_RGB, np.float32) * 255.0
_STD_RGB = np.array(preprocessing.IMAGENET_STD_RGB, np.float32) * 255.0
# Pillow's "L" conversion (ITU-R 601-2 luma), used by ImageEnhance.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# timm RandomErasing defaults.
_ERASE_AREA = (0.02, 1.0 / 3.0)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))
_ERASE_ATTEMPTS = 10
# Every scalar a row draws comes from ONE uniform vector per row (each op owns
# fixed slots, so turning one op on or off never changes what the others
# draw). One vectorized draw instead of a dozen `jax.random` calls keeps the
# compiled step small: each call inlines a threefry hash, and XLA on the CPU
# took seconds per call to compile.
_CROP = slice(0, 4)  # area, log aspect, x, y
_FLIP = 4
_AFFINE = slice(5, 8)  # angle, shift y, shift x
_COLOR = slice(8, 11)  # brightness, contrast, saturation
_ERASE_APPLY = 11
_ERASE_TOP, _ERASE_LEFT = 12, 13
_ERASE_AREAS = slice(14, 14 + _ERASE_ATTEMPTS)
_ERASE_ASPECTS = slice(14 + _ERASE_ATTEMPTS, 14 + 2 * _ERASE_ATTEMPTS)
_NUM_DRAWS = 14 + 2 * _ERASE_ATTEMPTS


def resize_images(images: jax.Array, size: int) -> jax.Array:
  """Deterministic full-image resize of a batch to float32 (B, size, size, 3).

  Bilinear (triangle kernel), antialiased when shrinking, like Pillow's
  BILINEAR resize; a batch already at `size` is returned unchanged (as
  float32).
  """
  x = jnp.asarray(images, jnp.float32)
  _check_images(x)
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear",
                          antialias=True)


def train_images(images: jax.Array, *, key: jax.Array, step: jax.Array,
                 augment, size: int) -> jax.Array:
  """Training augmentation of a global batch (see the module docstring).

  Args:
    images: uint8 (or float in [0, 255]) (B, H, W, 3), the whole global batch
      (row r is global example r of this step's batch).
    key: the augmentation stream's base key (typed or raw uint32).
    step: the train step (scalar int, traced is fine).
    augment: `config.augment` (flip, crop_scale, aspect_ratio, color_jitter,
      erasing_prob, rotate_degrees, translate); read at trace time.
    size: output side in pixels.

  Returns:
    float32 (B, size, size, 3) in [0, 255].
  """
  opts = _options(augment)
  x = jnp.asarray(images, jnp.float32)
  _check_images(x)
  step_key = jax.random.fold_in(key, step)
  rows = jnp.arange(x.shape[0], dtype=jnp.uint32)
  row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
  per_row = lambda image, k: _augment_one(image, k, opts, size)  # noqa: E731
  return jax.vmap(per_row)(x, row_keys)


# --------------------------------------------------------------------------
# Options.
# --------------------------------------------------------------------------
def _options(augment) -> dict:
  """Reads and validates `config.augment` into Python floats (static)."""
  def get(name):
    try:
      return getattr(augment, name)
    except AttributeError:
      try:
        return augment[name]
      except (KeyError, TypeError):
        raise ValueError(
            f"config.augment has no field {name!r}; start configs from "
            "affectjax.config_base.get_base_config().") from None

  def pair(name, low, high):
    value = tuple(float(v) for v in get(name))
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
      raise ValueError(
          f"--config.augment.{name}={get(name)!r}: need two numbers"
          f" {low} <= a <= b <= {high}.")
    return value

  def number(name, low, high):
    value = float(get(name))
    if not low <= value <= high:
      raise ValueError(
          f"--config.augment.{name}={value}: must be in [{low}, {high}].")
    return value

  scale = pair("crop_scale", 0.0, 1.0)
  if scale[0] <= 0:
    raise ValueError(f"--config.augment.crop_scale={scale}: the area fraction"
                     " must be > 0.")
  ratio = pair("aspect_ratio", 0.0, math.inf)
  if ratio[0] <= 0:
    raise ValueError(f"--config.augment.aspect_ratio={ratio}: ratios must be"
                     " > 0 (width / height).")
  return {
      "crop_scale": scale,
      "log_ratio": (math.log(ratio[0]), math.log(ratio[1])),
      "flip": bool(get("flip")),
      "color_jitter": number("color_jitter", 0.0, 1.0),
      "erasing_prob": number("erasing_prob", 0.0, 1.0),
      "rotate_degrees": number("rotate_degrees", 0.0, 180.0),
      "translate": number("translate", 0.0, 1.0),
  }


def _check_images(x):
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got shape {x.shape}.")


# --------------------------------------------------------------------------
# Per-image ops (vmapped over the batch).
# --------------------------------------------------------------------------
def _augment_one(image, key, opts, size):
  u = jax.random.uniform(key, (_NUM_DRAWS,))
  out = _random_resized_crop(image, u[_CROP], opts, size)
  if opts["flip"]:
    out = jnp.where(u[_FLIP] < 0.5, out[:, ::-1], out)
  if opts["rotate_degrees"] > 0 or opts["translate"] > 0:
    deg, shift = opts["rotate_degrees"], opts["translate"]
    angle = (2.0 * u[_AFFINE][0] - 1.0) * deg
    shift_yx = ((2.0 * u[_AFFINE][1:] - 1.0) * shift
                * jnp.array(out.shape[:2], jnp.float32))
    out = affine(out, angle, shift_yx)
  if opts["color_jitter"] > 0:
    j = opts["color_jitter"]
    low = max(0.0, 1.0 - j)
    factors = low + u[_COLOR] * (1.0 + j - low)
    out = color_jitter(out, factors[0], factors[1], factors[2])
  if opts["erasing_prob"] > 0:
    found, top, left, eh, ew = erase_box(u, out.shape[0], out.shape[1])
    rows = jnp.arange(out.shape[0])[:, None, None]
    cols = jnp.arange(out.shape[1])[None, :, None]
    inside = ((rows >= top) & (rows < top + eh) & (cols >= left)
              & (cols < left + ew) & found
              & (u[_ERASE_APPLY] < opts["erasing_prob"]))
    # Drawn flat: a multi-dimensional shape made XLA's CPU compile of the
    # vmapped threefry several times slower.
    noise = jax.random.normal(jax.random.fold_in(key, 1),
                              (out.size,)).reshape(out.shape)
    noise = jnp.clip(noise * _STD_RGB + _MEAN_RGB, 0.0, 255.0)
    out = jnp.where(inside, noise, out)
  return jnp.clip(out, 0.0, 255.0)


def _random_resized_crop(image, u, opts, size):
  """A random crop box (continuous edges, see the module doc), resampled to size.

  `u` holds four U(0, 1) draws: area fraction, log aspect, x and y position.
  """
  h, w = image.shape[0], image.shape[1]
  (lo, hi), (rlo, rhi) = opts["crop_scale"], opts["log_ratio"]
  area = h * w * (lo + u[0] * (hi - lo))
  aspect = jnp.exp(rlo + u[1] * (rhi - rlo))
  cw = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
  ch = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
  x0 = u[2] * (w - cw)
  y0 = u[3] * (h - ch)
  return crop_and_resize(image, (y0, x0, ch, cw), size)


def crop_and_resize(image, box, size: int):
  """Resamples the box (top, left, height, width), in pixels, to size x size.

  A pixel's centre is at (i + 0.5); the box's edges map to the output's edges,
  as in Pillow's `Image.resize(size, BILINEAR, box=(left, top, right,
  bottom))`. Antialiased when the box is larger than `size`.
  """
  y0, x0, ch, cw = box
  sy, sx = size / ch, size / cw
  return jax.image.scale_and_translate(
      image, (size, size, image.shape[2]), (0, 1),
      jnp.stack([sy, sx]), jnp.stack([-y0 * sy, -x0 * sx]), "linear",
      antialias=True)


def crop_batch(images: jax.Array, box) -> jax.Array:
  """`crop_and_resize` of the same box (top, left, height, width), in pixels,
  of every image of a square batch (B, S, S, C), back to S x S (test-time
  crops, `scoring.tta_views`)."""
  size = images.shape[1]
  if images.shape[2] != size:
    raise ValueError(f"crop_batch: square images expected, got {images.shape}.")
  return jax.vmap(lambda image: crop_and_resize(image, box, size))(images)


def affine(image, angle_degrees, shift_yx):
  """Rotates about the centre by `angle_degrees` (counter-clockwise as seen)
  and shifts by `shift_yx` pixels; bilinear, borders mirrored.

  Output pixel p samples the input at R(angle)^-1 (p - c - shift) + c, with c
  the image centre and (row, col) coordinates; the same as
  `scipy.ndimage.affine_transform(..., order=1, mode='mirror')` with that
  matrix and offset.
  """
  h, w = image.shape[0], image.shape[1]
  theta = jnp.deg2rad(angle_degrees)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                            jnp.arange(w, dtype=jnp.float32), indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  dy = rows - cy - shift_yx[0]
  dx = cols - cx - shift_yx[1]
  # Inverse rotation in (row, col) coordinates; rows grow downwards, so a
  # positive angle turns the picture counter-clockwise as displayed.
  src_y = cos * dy + sin * dx + cy
  src_x = -sin * dy + cos * dx + cx
  sample = lambda channel: jax.scipy.ndimage.map_coordinates(  # noqa: E731
      channel, [src_y, src_x], order=1, mode="mirror")
  return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def color_jitter(image, brightness, contrast, saturation):
  """Pillow ImageEnhance Brightness, Contrast, Saturation(=Color), in order.

  Each factor 1 is the identity; each step is clipped to [0, 255].
  """
  luma = jnp.asarray(_LUMA)
  x = jnp.clip(image * brightness, 0.0, 255.0)
  mean_grey = jnp.mean(x @ luma)
  x = jnp.clip((x - mean_grey) * contrast + mean_grey, 0.0, 255.0)
  grey = (x @ luma)[..., None]
  return jnp.clip((x - grey) * saturation + grey, 0.0, 255.0)


def erase_box(u, height: int, width: int):
  """timm RandomErasing's box from a row's draws `u`: (found, top, left, h, w).

  Tries `_ERASE_ATTEMPTS` candidates at once and keeps the first that fits
  (h < height and w < width, as timm); `found` is False when none does. The
  position is uniform over the integers [0, height - h] x [0, width - w]
  (Python's inclusive `random.randint` in timm).
  """
  area = height * width * (_ERASE_AREA[0] + u[_ERASE_AREAS]
                           * (_ERASE_AREA[1] - _ERASE_AREA[0]))
  aspect = jnp.exp(_ERASE_LOG_ASPECT[0] + u[_ERASE_ASPECTS]
                   * (_ERASE_LOG_ASPECT[1] - _ERASE_LOG_ASPECT[0]))
  eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (eh < height) & (ew < width)
  first = jnp.argmax(fits)
  eh, ew = eh[first], ew[first]
  top = jnp.floor(u[_ERASE_TOP] * (height - eh + 1)).astype(jnp.int32)
  left = jnp.floor(u[_ERASE_LEFT] * (width - ew + 1)).astype(jnp.int32)
  return fits[first], top, left, eh, ew
