"""Model contract tests on the tiny custom CNN: shapes, dtypes, BN modes, preprocessing, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affectjax import models
from affectjax.models import preprocessing

TINY = dict(widths=(4, 8), head_hidden=8, dropout=0.5)


def _images(n=4, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _bn_stats(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def test_custom_cnn_output_contract():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), num_classes=8, **TINY)
  x = model.preprocess(_images())
  logits, va = model(x)
  assert logits.shape == (4, 8) and logits.dtype == jnp.float32
  assert va.shape == (4, 2) and va.dtype == jnp.float32
  assert np.all(np.abs(np.asarray(va)) <= 1.0)
  feats = model.features(x)
  # Two stages -> one 2x2 max-pool: 16 px -> 8 px, last width 8 channels.
  assert feats.shape == (4, 8, 8, 8)


def test_num_classes_and_module_groups():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), num_classes=5, **TINY)
  logits, _ = model(model.preprocess(_images(2)))
  assert logits.shape == (2, 5)
  params = nnx.state(model, nnx.Param)
  assert set(nnx.to_pure_dict(params)) == {"backbone", "head"}


def test_batchnorm_updates_only_when_training_backbone():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  x = model.preprocess(_images())
  before = _bn_stats(model)
  model(x, train=False)
  model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=1))
  jax.tree.map(np.testing.assert_array_equal, before, _bn_stats(model))
  model(x, train=True, train_backbone=True, rngs=nnx.Rngs(dropout=1))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         before, _bn_stats(model)))
  assert all(changed)


def test_dropout_uses_call_time_rngs_only():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  x = model.preprocess(_images())
  a = model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=3))[0]
  b = model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=3))[0]
  c = model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=4))[0]
  np.testing.assert_array_equal(a, b)  # Same key -> same masks.
  assert not np.array_equal(a, c)
  # Eval is deterministic and differs from a dropped-out pass.
  e1, e2 = model(x)[0], model(x)[0]
  np.testing.assert_array_equal(e1, e2)
  with pytest.raises(ValueError, match="rngs"):
    model(x, train=True)


def test_preprocess_module_level_matches_model():
  imgs = _images()
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  np.testing.assert_array_equal(models.preprocess("custom_cnn", imgs),
                                model.preprocess(imgs))
  expected = (imgs / 255.0 - np.array(preprocessing.IMAGENET_MEAN_RGB)) / np.array(
      preprocessing.IMAGENET_STD_RGB)
  np.testing.assert_allclose(model.preprocess(imgs), expected, rtol=1e-5, atol=1e-5)


def test_preprocess_is_jittable():
  imgs = _images()
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  np.testing.assert_allclose(jax.jit(model.preprocess)(imgs), model.preprocess(imgs),
                             rtol=1e-5, atol=1e-6)


def test_bad_names_and_kwargs_are_explained():
  with pytest.raises(ValueError, match="config.model.name"):
    models.create("resnet", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="widthz"):
    models.create("custom_cnn", rngs=nnx.Rngs(0), widthz=(4,))
  with pytest.raises(ValueError, match="config.model.dtype"):
    models.create("custom_cnn", rngs=nnx.Rngs(0), dtype="int8", **TINY)
