"""Device augmentation (affectjax.augment) against Pillow and scipy, and its RNG contract.

Each op is checked against the library its formula comes from: the crop and
the resize against Pillow's BILINEAR resize (with a box), colour jitter
against Pillow's ImageEnhance, the affine against scipy.ndimage. The
randomness is checked as the trainer relies on it: a pure function of (key,
step, global row), equal on 1 and 8 devices. Tiny images: XLA CPU compile
time dominates, so each config below is jitted once.
"""
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageEnhance, ImageFilter

from affectjax import augment
from affectjax import config_base


def aug_config(**overrides) -> ml_collections.ConfigDict:
  c = config_base.get_base_config().augment
  for k, v in overrides.items():
    c[k] = v
  return c


OFF = dict(flip=False, crop_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
ALL_ON = dict(flip=True, crop_scale=(0.5, 1.0), aspect_ratio=(0.75, 1.33),
              color_jitter=0.4, erasing_prob=0.5, rotate_degrees=15.0,
              translate=0.1)


def jitted(size, **overrides):
  c = aug_config(**overrides)
  return jax.jit(lambda x, key, step: augment.train_images(
      x, key=key, step=step, augment=c, size=size))


def smooth_image(seed, h=40, w=40):
  """A natural-ish image: noise blurred, so resampling differences stay small."""
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  return np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)))


def test_resize_images_matches_pillow_bilinear():
  img = smooth_image(0)
  for size in (16, 64):  # Antialiased down, plain bilinear up.
    ours = np.asarray(augment.resize_images(img[None], size))[0]
    ref = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    # Pillow rounds to uint8; ours is the unrounded float.
    np.testing.assert_allclose(ours, ref, atol=1.01)
  same = augment.resize_images(img[None], 40)
  np.testing.assert_array_equal(np.asarray(same)[0], img)


def test_crop_and_resize_matches_pillow_box():
  img = smooth_image(1)
  f = jax.jit(lambda x, box: augment.crop_and_resize(x, box, 16))
  for top, left, h, w in [(3.25, 5.5, 20.0, 17.5), (0.0, 0.0, 40.0, 40.0),
                          (10.0, 2.0, 8.0, 9.0), (30.5, 29.0, 9.5, 11.0)]:
    ours = np.asarray(f(img.astype(np.float32), jnp.array([top, left, h, w])))
    ref = np.asarray(Image.fromarray(img).resize(
        (16, 16), Image.BILINEAR, box=(left, top, left + w, top + h)))
    np.testing.assert_allclose(ours, ref, atol=1.01, err_msg=str((top, left)))


def test_crop_batch_matches_pillow_box_for_every_image():
  imgs = np.stack([smooth_image(k, 30, 30) for k in (4, 5)])
  box = (2.75, 1.5, 27.0, 26.5)  # top, left, height, width; back to 30 x 30.
  ours = np.asarray(jax.jit(augment.crop_batch, static_argnums=1)(
      imgs.astype(np.float32), box))
  assert ours.shape == imgs.shape
  for img, out in zip(imgs, ours):
    ref = np.asarray(Image.fromarray(img).resize(
        (30, 30), Image.BILINEAR, box=(1.5, 2.75, 1.5 + 26.5, 2.75 + 27.0)))
    np.testing.assert_allclose(out, ref, atol=1.01)
  assert not np.allclose(ours[0], imgs[0], atol=2)  # Really cropped.


def test_color_jitter_matches_pillow_image_enhance():
  img = smooth_image(2, 24, 24)
  f = jax.jit(augment.color_jitter)
  for b, c, s in [(1.3, 1.0, 1.0), (1.0, 0.6, 1.0), (1.0, 1.0, 1.4),
                  (0.7, 1.3, 0.5), (1.0, 1.0, 1.0)]:
    ours = np.asarray(f(img.astype(np.float32), b, c, s))
    pil = Image.fromarray(img)
    pil = ImageEnhance.Brightness(pil).enhance(b)
    pil = ImageEnhance.Contrast(pil).enhance(c)
    pil = ImageEnhance.Color(pil).enhance(s)
    # Pillow truncates to uint8 after each of the three steps (up to 1 each).
    np.testing.assert_allclose(ours, np.asarray(pil), atol=3.01,
                               err_msg=str((b, c, s)))
    if sum(f != 1.0 for f in (b, c, s)) <= 1:  # One truncation: off by < 1.
      np.testing.assert_allclose(ours, np.asarray(pil), atol=1.01)
      assert np.mean(np.abs(ours - np.asarray(pil))) < 0.6


def test_affine_matches_scipy_and_rotates_counter_clockwise():
  img = smooth_image(3, 21, 21).astype(np.float32)
  f = jax.jit(augment.affine)
  angle, shift = 12.0, np.array([2.0, -3.0], np.float32)
  ours = np.asarray(f(img, angle, shift))
  t = np.deg2rad(angle)
  matrix = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
  centre = np.array([10.0, 10.0])
  offset = centre - matrix @ (centre + shift)
  ref = np.stack([scipy.ndimage.affine_transform(
      img[..., k].astype(np.float64), matrix, offset=offset, order=1,
      mode="mirror") for k in range(3)], axis=-1)
  np.testing.assert_allclose(ours, ref, atol=1e-3)
  # A dot at the top centre, turned +90 degrees, lands at the left centre.
  dot = np.zeros((21, 21, 3), np.float32)
  dot[2, 10] = 255.0
  turned = np.asarray(f(dot, 90.0, np.zeros(2, np.float32)))
  assert np.unravel_index(turned[..., 0].argmax(), (21, 21)) == (10, 2)


def test_identity_when_crop_is_off_and_flip_is_an_exact_mirror():
  """Crop (1, 1), aspect (1, 1), S == size: every row comes back either
  exactly as it was (the resampling is the identity) or exactly mirrored."""
  x = np.random.default_rng(5).integers(0, 256, (64, 8, 8, 3), np.uint8)
  out = jitted(8, **dict(OFF, flip=True))(x, jax.random.key(1), 0)
  assert out.dtype == jnp.float32
  out = np.asarray(out)
  same = np.all(out == x, axis=(1, 2, 3))
  mirrored = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)  # Every row is exactly one of the two.
  assert 16 < mirrored.sum() < 48  # About half are flipped.


def _gradient_images(n, side):
  """Channel 0 = 6 * column, channel 1 = 6 * row: linear, so a bilinear crop
  of it tells its own box back."""
  cols, rows = np.meshgrid(np.arange(side), np.arange(side))
  img = np.stack([cols * 6, rows * 6, np.zeros_like(cols)], -1)
  return np.broadcast_to(img, (n, side, side, 3)).astype(np.uint8)


def _measured_boxes(out, size):
  """(left, top, width, height) of each crop, from interior output pixels."""
  j1, j2 = 2, size - 3
  boxes = []
  for channel, axis in ((0, 2), (1, 1)):
    line = np.take(out[..., channel], size // 2, axis=3 - axis) / 6.0
    a, b = line[:, j1], line[:, j2]
    extent = (b - a) / (j2 - j1) * size
    start = a + 0.5 - (j1 + 0.5) * extent / size
    boxes.append((start, extent))
  (left, width), (top, height) = boxes
  return left, top, width, height


def test_random_resized_crop_statistics():
  """Area fraction U(0.15, 0.35), aspect log-uniform in (1/2, 2), position
  uniform over the room left: measured back from crops of gradient images
  (no crop reaches the border clamp at these values)."""
  side, size, n = 32, 16, 256
  f = jitted(size, **dict(OFF, crop_scale=(0.15, 0.35),
                          aspect_ratio=(0.5, 2.0)))
  left, top, width, height = _measured_boxes(
      np.asarray(f(_gradient_images(n, side), jax.random.key(3), 5),
                 np.float64), size)
  area, log_aspect = width * height / side**2, np.log(width / height)
  assert 0.145 < area.min() and area.max() < 0.355  # Measurement error.
  assert abs(area.mean() - 0.25) < 0.01  # sd 0.058 / sqrt(256) = 0.004.
  assert -0.70 < log_aspect.min() and log_aspect.max() < 0.70
  assert abs(log_aspect.mean()) < 0.08 and log_aspect.std() > 0.3
  for start, extent in ((left, width), (top, height)):
    u = start / (side - extent)  # Where in the room left the crop sits.
    assert u.min() > -0.01 and u.max() < 1.01
    assert abs(u.mean() - 0.5) < 0.06 and abs(u.std() - 0.289) < 0.05


@functools.lru_cache(maxsize=None)
def _all_on():
  return jitted(16, **ALL_ON)


def test_all_ops_shapes_range_and_determinism_from_step_and_row():
  f = _all_on()
  key = jax.random.key(42)
  one = np.random.default_rng(6).integers(0, 256, (1, 24, 24, 3), np.uint8)
  x = np.repeat(one, 8, axis=0)  # The same image in every row.
  out = np.asarray(f(x, key, 3))
  assert out.shape == (8, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 255.0
  np.testing.assert_array_equal(np.asarray(f(x, key, 3)), out)  # Same in, same out.
  for r in range(1, 8):  # Each row draws its own augmentation.
    assert not np.allclose(out[r], out[0], atol=1.0)
  assert not np.allclose(np.asarray(f(x, key, 4)), out, atol=1.0)  # Step.
  assert not np.allclose(np.asarray(f(x, jax.random.key(43), 3)), out, atol=1.0)
  # Row r depends only on (key, step, r) and its own image, not on the others.
  other = x.copy()
  other[1:] = 255 - other[1:]
  np.testing.assert_array_equal(np.asarray(f(other, key, 3))[0], out[0])


def test_one_device_equals_eight_devices():
  f = _all_on()
  key = jax.random.key(7)
  # Same shape as above, so the single-device program is the cached one.
  x = np.random.default_rng(8).integers(0, 256, (8, 24, 24, 3), np.uint8)
  single = np.asarray(f(x, key, 11))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 8
  sharded_x = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = f(sharded_x, key, 11)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-3)


def test_bad_augment_config_names_the_flag():
  x = np.zeros((2, 8, 8, 3), np.uint8)
  for field, value in [("crop_scale", (0.9, 0.5)), ("crop_scale", (0.0, 1.0)),
                       ("aspect_ratio", (0.0, 1.0)), ("erasing_prob", 1.5),
                       ("color_jitter", -0.1)]:
    with pytest.raises(ValueError, match=f"config.augment.{field}"):
      augment.train_images(x, key=jax.random.key(0), step=0,
                           augment=aug_config(**{field: value}), size=8)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    augment.resize_images(np.zeros((8, 8, 3)), 4)


@pytest.mark.parametrize("recipe", ["efficientnet_b3", "vgg16", "custom_cnn",
                                    "fer2013", "ferplus"])
def test_recipes_load_with_valid_augmentation_and_no_unknown_fields(recipe):
  """configs/recipes/*.py and their :tiny variants: the schema's fields only
  (a misspelt field would silently do nothing), and augmentation settings
  that `train_images` accepts."""
  path = pathlib.Path(__file__).parents[1] / "configs" / "recipes" / f"{recipe}.py"
  spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def fields(d, prefix=""):
    out = set()
    for k, v in d.items():
      if isinstance(v, ml_collections.ConfigDict) and k != "kwargs":
        out |= fields(v, f"{prefix}{k}.")
      else:
        out.add(prefix + k)
    return out

  schema = fields(config_base.get_base_config())
  # FER2013 and FER+ have no valence/arousal (masked in the loss); they
  # choose on their own holdout (PublicTest) and have a CPU-hour variant.
  fer = recipe.startswith("fer")
  variants = {"fer2013": ("cpu", "cpu_hour"), "ferplus": ("cpu",)}
  for arg in (None, "tiny") + variants.get(recipe, ()):
    c = module.get_config(arg)
    assert fields(c) == schema
    augment._options(c.augment)  # Raises naming the flag if invalid.
    assert c.augment.crop_scale[0] < 1.0
    assert c.loss.va_ccc_weight > 0 or fer
    if fer:
      assert c.data.selection_split == "holdout"
      assert c.num_classes == {"fer2013": 7, "ferplus": 8}[recipe]
  if recipe == "fer2013":
    # :cpu fits the 30-minute budget; :cpu_hour is the fixed-length run.
    assert module.get_config("cpu").time_budget == "30m"
    assert module.get_config("cpu_hour").time_budget == ""
    assert module.get_config("cpu_hour").total_steps == 11_000
  if recipe == "ferplus":
    # FER+'s :cpu keeps the measured fixed-length run (8,000 steps).
    cpu = module.get_config("cpu")
    assert (cpu.time_budget, cpu.total_steps) == ("", 8_000)
  tiny = module.get_config("tiny")
  assert tiny.total_steps <= 6 and tiny.ema_decay > 0
  with pytest.raises(ValueError, match="tiny"):
    module.get_config("huge")
