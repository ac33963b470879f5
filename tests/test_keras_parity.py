"""Converted VGG16 / EfficientNet-B3 compute what keras.applications computes.

For each backbone: build the Keras model (JAX backend), randomize every
weight (BatchNorm moving statistics and the EfficientNet Normalization layer
included), write the weights in the legacy HDF5 layout of the official files
with our writer, check that Keras' own legacy loader reads that file back,
convert it with `models.load_imagenet_weights`, and compare feature maps on
uint8 images: ours = model.features(model.preprocess(images)), Keras' = its
own preprocessing + model. 32 px, batch 2 (XLA CPU convs are slow); the full
224/300 px check is benchmarks/keras_parity_full.py.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import keras  # conftest sets KERAS_BACKEND=jax first.

from affectjax import models
from affectjax.models import keras_h5
from affectjax.models import keras_reference

SIZE = 32
RTOL = 1e-4


def images(seed=0, n=2):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def assert_close(ours, ref, rtol=RTOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  assert np.all(np.isfinite(ours))
  assert np.abs(ref).max() > 1e-3, "degenerate reference; rescale the random weights"
  rel_l2, rel_max = keras_reference.relative_errors(ours, ref)
  assert rel_l2 <= rtol and rel_max <= rtol, (rel_l2, rel_max)


def converted(name, path, **kwargs):
  """Our model, loaded from `path`; built abstractly because every backbone variable is loaded."""
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  models.load_imagenet_weights(model, path, **kwargs)
  # Every backbone variable must now hold a real array: nothing half-loaded.
  for leaf in jax.tree.leaves(nnx.state(model.backbone)):
    assert isinstance(leaf, jax.Array), type(leaf)
  return model


def assert_layers_match_keras(model, keras_model, name, x_uint8):
  """Every intermediate output (stem, each block, top) within RTOL of Keras' layer.

  Checking only the final map is not enough: a randomly weighted deep net is
  contractive, so a wrong stem can still give nearly equal final features.
  """
  ours = nnx.jit(lambda b, x: b.intermediates(b.preprocess(x)))(model.backbone, x_uint8)
  ref = keras_reference.tap_outputs(keras_model, ours,
                                    keras_reference.keras_preprocess(name, x_uint8))
  for tap in ours:
    assert_close(ours[tap], ref[tap])
  # The backbone's call (what model.features runs) is the last tap.
  np.testing.assert_array_equal(
      nnx.jit(lambda b, x: b(b.preprocess(x)))(model.backbone, x_uint8), ours[list(ours)[-1]])


def snapshot(model):
  return [np.asarray(w.numpy()).copy() for w in model.weights]


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory):
  keras_model = keras_reference.build("vgg16", SIZE)
  keras_reference.randomize(keras_model, seed=1)
  path = str(tmp_path_factory.mktemp("vgg") / "vgg16_notop.h5")
  keras_h5.write_legacy(path, keras_reference.legacy_layers(keras_model))
  return keras_model, path


@pytest.fixture(scope="module")
def efficientnet_b3(tmp_path_factory):
  """Keras EfficientNetB3 as built for weights='imagenet' (with the extra rescale), randomized."""
  path = str(tmp_path_factory.mktemp("effnet") / "efficientnetb3_notop.h5")
  # The weights='imagenet' graph, built offline: no download, no load yet.
  keras_model = keras_reference.build("efficientnet_b3", SIZE, imagenet_graph=True)
  keras_reference.randomize(keras_model, seed=2)
  expected = snapshot(keras_model)
  keras_h5.write_legacy(path, keras_reference.legacy_layers(keras_model))
  # Our writer's file must be a file Keras itself reads: scramble, reload, compare.
  keras_reference.randomize(keras_model, seed=3)
  keras_model.load_weights(path)
  for a, b in zip(expected, snapshot(keras_model)):
    np.testing.assert_array_equal(a, b)
  return keras_model, path


def test_vgg16_matches_keras(vgg16):
  keras_model, path = vgg16
  model = converted("vgg16", path)
  assert_layers_match_keras(model, keras_model, "vgg16", images(0))


def test_vgg16_module_preprocess_is_keras_caffe():
  x = images(1)
  ref = keras.applications.vgg16.preprocess_input(x.astype(np.float32))
  np.testing.assert_allclose(models.preprocess("vgg16", x), ref, rtol=1e-6, atol=1e-4)


def test_efficientnet_b3_matches_keras_imagenet_stem(efficientnet_b3):
  keras_model, path = efficientnet_b3
  assert any(l.name.startswith("rescaling") and l.name != "rescaling"
             for l in keras_model.layers), "Keras model lacks the imagenet rescale"
  x = images(2)
  model = converted("efficientnet_b3", path)
  assert_layers_match_keras(model, keras_model, "efficientnet_b3", x)
  # The stem alone: our preprocess == Keras Rescaling -> Normalization -> Rescaling.
  stem_out = [l for l in keras_model.layers if l.name.startswith("rescaling")][-1].output
  keras_stem = keras.Model(keras_model.input, stem_out)
  np.testing.assert_allclose(model.preprocess(x), keras_stem.predict(x.astype(np.float32), verbose=0),
                             rtol=1e-5, atol=1e-5)


def test_efficientnet_keras3_weights_file_loads_identically(efficientnet_b3, tmp_path):
  keras_model, legacy_path = efficientnet_b3
  keras3_path = str(tmp_path / "b3.weights.h5")
  keras_model.save_weights(keras3_path)
  a = converted("efficientnet_b3", legacy_path)
  b = converted("efficientnet_b3", keras3_path)
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(a.backbone)), nnx.to_pure_dict(nnx.state(b.backbone)))


def test_efficientnet_stem_without_imagenet_rescale_matches_keras_normalization(efficientnet_b3):
  """Weights of a weights=None Keras model: no 1/sqrt(std) rescale after Normalization."""
  _, path = efficientnet_b3
  model = converted("efficientnet_b3", path, imagenet_rescale=False)
  norm = keras.layers.Normalization(axis=-1, mean=np.asarray(model.backbone.norm_mean[...]),
                                    variance=np.asarray(model.backbone.norm_variance[...]))
  x = images(3)
  ref = norm(keras.layers.Rescaling(1.0 / 255.0)(x.astype(np.float32)))
  np.testing.assert_allclose(model.preprocess(x), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_fresh_efficientnet_preprocess_is_imagenet_standardization():
  """A fresh model and the converted official weights both compute (x/255 - mean)/std."""
  x = images(4)
  expected = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(models.preprocess("efficientnet_b3", x), expected,
                             rtol=1e-5, atol=1e-5)
