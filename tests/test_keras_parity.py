"""Converted VGG16 / EfficientNet-B3 compute what keras.applications computes.

For each backbone: build the Keras model (JAX backend) as weights='imagenet'
builds it, randomize every weight (BatchNorm moving statistics and the
EfficientNet Normalization layer included), and write the same weights in
each historical file naming: Keras 1 (the official VGG16 file), TF-Keras 2
(the official EfficientNet file), Keras 3's legacy .h5 and Keras 3
.weights.h5. For each file, Keras' own loader reads it back exactly,
`models.load_imagenet_weights` converts it, and every intermediate output
(VGG16's five pools; EfficientNet's stem, 26 blocks and top) is compared on
uint8 images: ours = model.preprocess + backbone, Keras' = its own
preprocessing + model. 32 px, batch 2 (XLA CPU convs are slow); the full
224/300 px check is benchmarks/keras_parity_full.py.
"""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

import keras  # conftest sets KERAS_BACKEND=jax first.

from affectjax import models
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


# Compiled once per architecture: every model converted below has the same graph.
_intermediates = nnx.jit(lambda b, x: b.intermediates(b.preprocess(x)))
_features = nnx.jit(lambda b, x: b(b.preprocess(x)))


@functools.cache
def _abstract(name):
  """(graphdef, state) of an abstract model: tracing B3's init takes seconds, merging it none."""
  return nnx.split(nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0))))


def converted(name, path, **kwargs):
  """Our model, loaded from `path`; built abstractly because every backbone variable is loaded."""
  model = nnx.merge(*_abstract(name), copy=True)
  models.load_imagenet_weights(model, path, **kwargs)
  # Every backbone variable now holds a host array (nothing half-loaded, and
  # nothing sent to a device one array at a time).
  for leaf in jax.tree.leaves(nnx.state(model.backbone)):
    assert type(leaf) is np.ndarray, type(leaf)
  return model


@dataclasses.dataclass
class Reference:
  """A randomized keras.applications model, its weights, and a file of them (TF-Keras 2 naming)."""
  name: str
  keras_model: "keras.Model"
  path: str
  expected: list
  taps: "keras.Model | None" = None


def assert_layers_match_keras(model, ref: Reference, x_uint8):
  """Every intermediate output (stem, each block, top) within RTOL of Keras' layer.

  Checking only the final map is not enough: a randomly weighted deep net is
  contractive, so a wrong stem can still give nearly equal final features.
  Keras' outputs come from `ref.keras_model` with whatever weights it holds.
  """
  ours = _intermediates(model.backbone, x_uint8)
  if ref.taps is None:
    ref.taps = keras_reference.tap_model(ref.keras_model, list(ours))
  outs = ref.taps.predict(keras_reference.keras_preprocess(ref.name, x_uint8),
                          batch_size=len(x_uint8), verbose=0)
  for tap, out in zip(ours, outs):
    assert_close(ours[tap], out)
  # The backbone's call (what model.features runs) is the last tap. Not
  # bit-equal: with impl='fused' (the CPU default) the depthwise taps' sums
  # fuse differently in the two programs, which rounds differently.
  assert_close(_features(model.backbone, x_uint8), ours[list(ours)[-1]], rtol=1e-5)


def snapshot(model):
  return [np.asarray(w.numpy()).copy() for w in model.weights]


def assert_weights_equal(keras_model, expected):
  got = snapshot(keras_model)
  assert len(got) == len(expected)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)


def reference(name, tmp_path_factory, seed):
  """keras.applications' model as built for weights='imagenet' (EfficientNet: with the extra rescale)."""
  path = str(tmp_path_factory.mktemp(name) / f"{name}_notop.h5")
  # The weights='imagenet' graph, built offline: no download, no load yet.
  keras_model = keras_reference.build(name, SIZE, imagenet_graph=True)
  keras_reference.randomize(keras_model, seed=seed)
  expected = snapshot(keras_model)
  keras_reference.write_weights(keras_model, path, "tf_keras2")
  # Our writer's file must be a file Keras itself reads: scramble, reload, compare.
  # (Loading also refreshes the Normalization layer's cached mean/variance.)
  keras_reference.randomize(keras_model, seed=seed + 100)
  keras_model.load_weights(path)
  assert_weights_equal(keras_model, expected)
  return Reference(name, keras_model, path, expected)


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory):
  return reference("vgg16", tmp_path_factory, seed=1)


@pytest.fixture(scope="module")
def efficientnet_b3(tmp_path_factory):
  return reference("efficientnet_b3", tmp_path_factory, seed=2)


@pytest.mark.parametrize("naming", keras_reference.NAMINGS)
@pytest.mark.parametrize("name", ["vgg16", "efficientnet_b3"])
def test_each_keras_generation_file_loads_as_keras_loads_it(name, naming, request, tmp_path):
  """Keras 1 ('block1_conv1_W_1:0', the real VGG16 file), TF-Keras 2 (the real
  EfficientNet file), Keras 3 legacy .h5 and Keras 3 .weights.h5 files of the
  same weights: (a) Keras loads each, (b) so do we, (c) every layer's output
  agrees on the same input.
  """
  ref = request.getfixturevalue(name)
  keras_model = ref.keras_model
  path = ref.path
  if naming != "tf_keras2":
    keras_model.set_weights(ref.expected)
    path = str(tmp_path / (f"{name}_notop" + (".weights.h5" if naming == "keras3" else ".h5")))
    keras_reference.write_weights(keras_model, path, naming)
  # (a) What weights='imagenet' does after the download: model.load_weights(file).
  keras_reference.randomize(keras_model, seed=99)
  keras_model.load_weights(path)
  assert_weights_equal(keras_model, ref.expected)
  if name == "vgg16":  # And keras.applications.VGG16(weights=<file>) builds from it.
    assert_weights_equal(keras_reference.build(name, SIZE, weights_file=path), ref.expected)
  # (b), (c)
  model = converted(name, path)
  assert_layers_match_keras(model, ref, images(keras_reference.NAMINGS.index(naming)))


def test_plan_order_is_keras_layer_order(vgg16, efficientnet_b3):
  """Keras' legacy loader pairs layers by position: our plan must list Keras' weighted layers in order."""
  for ref in (vgg16, efficientnet_b3):
    model = nnx.merge(*_abstract(ref.name), copy=True)
    weighted = [l.name for l in ref.keras_model.layers if l.weights]
    plan = model.backbone.keras_weight_plan()
    # Keras numbers the Normalization layer per session ('normalization_3').
    assert [re.sub(r"^normalization_\d+$", "normalization", n) for n in weighted] == list(plan)
    assert [len(l.weights) for l in ref.keras_model.layers if l.weights] == [
        len(layer.targets) for layer in plan.values()]


def test_vgg16_module_preprocess_is_keras_caffe():
  x = images(1)
  ref = keras.applications.vgg16.preprocess_input(x.astype(np.float32))
  np.testing.assert_allclose(models.preprocess("vgg16", x), ref, rtol=1e-6, atol=1e-4)


def test_efficientnet_b3_stem_is_keras_imagenet_stem(efficientnet_b3):
  """Our preprocess == Keras Rescaling -> Normalization -> Rescaling(1/sqrt(std))."""
  keras_model, path = efficientnet_b3.keras_model, efficientnet_b3.path
  rescalings = [l for l in keras_model.layers if l.name.startswith("rescaling")]
  assert len(rescalings) == 2, "Keras model lacks the imagenet rescale"
  keras_model.load_weights(path)
  x = images(2)
  model = converted("efficientnet_b3", path)
  keras_stem = keras.Model(keras_model.input, rescalings[-1].output)
  np.testing.assert_allclose(model.preprocess(x), keras_stem.predict(x.astype(np.float32), verbose=0),
                             rtol=1e-5, atol=1e-5)


def test_efficientnet_stem_without_imagenet_rescale_matches_keras_normalization(efficientnet_b3):
  """Weights of a weights=None Keras model: no 1/sqrt(std) rescale after Normalization."""
  path = efficientnet_b3.path
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
