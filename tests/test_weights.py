"""Weight files: the cache/download/md5 logic and the all-or-nothing loader's errors.

Uses a shrunken EfficientNet (same code path as B3) so files stay small; the
VGG16/EfficientNet-B3 numerical parity with Keras is in test_keras_parity.py.
"""
import inspect
import os

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

from keras.src.applications import efficientnet as keras_efficientnet
from keras.src.applications import vgg16 as keras_vgg16
from keras.src.legacy.saving import legacy_h5_format

from affectjax import models
from affectjax.models import imagenet
from affectjax.models import keras_h5
from affectjax.models import keras_plan

SMALL = dict(width_coefficient=0.1, depth_coefficient=0.1, head_hidden=0, dropout=0.0)


def small_effnet(seed, **overrides):
  """A small EfficientNet with random values, built without per-shape XLA compiles.

  Eager Flax init compiles one random-number program per parameter shape
  (~0.3 s each on a loaded 2-core machine); eval_shape + numpy values is instant.
  """
  model = nnx.eval_shape(lambda: models.create(
      "efficientnet_b3", rngs=nnx.Rngs(0), **{**SMALL, **overrides}))
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      var.set_value(jax.numpy.asarray(rng.uniform(0.5, 1.5, var.shape).astype(var.dtype)))
  return model


def backbone_state(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.backbone)))


def assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def source():
  """A small random EfficientNet and its weights as legacy-format file layers."""
  model = small_effnet(0)
  return model, keras_plan.export(model.backbone.keras_weight_plan())


@pytest.fixture
def weight_file(source, tmp_path):
  path = str(tmp_path / "small_notop.h5")
  keras_h5.write_legacy(path, source[1])
  return path


def test_round_trip_loads_every_backbone_variable(source, weight_file):
  target = small_effnet(1)
  head_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(target.head)))
  models.load_imagenet_weights(target, weight_file, imagenet_rescale=False)
  expected, loaded = backbone_state(source[0]), backbone_state(target)
  # The rescale is not in Keras files: it is set by the imagenet_rescale flag.
  np.testing.assert_array_equal(loaded.pop("norm_rescale"), np.ones(3))
  expected.pop("norm_rescale")
  assert_tree_equal(expected, loaded)
  assert_tree_equal(head_before, nnx.to_pure_dict(nnx.state(target.head)))
  assert os.listdir(os.path.dirname(weight_file)) == ["small_notop.h5"]  # No temp file left.


def test_imagenet_rescale_flag_sets_keras_stem_rescale(weight_file):
  target = small_effnet(1)
  models.load_imagenet_weights(target, weight_file)  # Default: official ImageNet file.
  np.testing.assert_allclose(target.backbone.norm_rescale[...],
                             1 / np.sqrt([0.229, 0.224, 0.225]), rtol=1e-6)


def _assert_rejected(path, match, model=None):
  model = model or small_effnet(1)
  before = backbone_state(model)
  with pytest.raises(keras_h5.WeightFileError, match=match):
    models.load_imagenet_weights(model, path)
  assert_tree_equal(before, backbone_state(model))  # Nothing half-loaded.


def test_truncated_file_is_rejected_without_touching_the_model(weight_file):
  size = os.path.getsize(weight_file)
  with open(weight_file, "r+b") as f:
    f.truncate(size // 2)
  _assert_rejected(weight_file, "truncated")


def test_not_hdf5_and_missing_files(tmp_path):
  bogus = tmp_path / "weights.h5"
  bogus.write_text("<html>404 Not Found</html>")
  _assert_rejected(str(bogus), "not an HDF5 file")
  _assert_rejected(str(tmp_path / "absent.h5"), "does not exist")


def test_other_architecture_is_rejected_by_shape(tmp_path):
  other = small_effnet(2, width_coefficient=0.2)
  path = str(tmp_path / "wider.h5")
  keras_h5.write_legacy(path, keras_plan.export(other.backbone.keras_weight_plan()))
  _assert_rejected(path, r"has shape .* the model expects")


def test_extra_and_missing_layers_are_named(source, tmp_path):
  layers = list(source[1])
  with_top = layers + [("predictions", [("predictions/kernel:0", np.zeros((8, 4), np.float32))])]
  path = str(tmp_path / "with_top.h5")
  keras_h5.write_legacy(path, with_top)
  _assert_rejected(path, r"unexpected layers \['predictions'\].*_notop")
  path = str(tmp_path / "missing.h5")
  keras_h5.write_legacy(path, [l for l in layers if l[0] != "top_bn"])
  _assert_rejected(path, r"missing layers \['top_bn'\]")


def test_wrong_weight_order_is_rejected(source, tmp_path):
  layers = []
  for name, weights in source[1]:
    if name == "stem_bn":  # Swap gamma and beta.
      weights = [weights[1], weights[0]] + weights[2:]
    layers.append((name, weights))
  path = str(tmp_path / "swapped.h5")
  keras_h5.write_legacy(path, layers)
  _assert_rejected(path, "stem_bn.*expects 'gamma'")


def test_models_without_imagenet_weights_say_so(weight_file):
  cnn = models.create("custom_cnn", rngs=nnx.Rngs(0), widths=(4,))
  with pytest.raises(ValueError, match="scratch"):
    models.load_imagenet_weights(cnn, weight_file)
  with pytest.raises(ValueError, match="No ImageNet weights for model 'custom_cnn'"):
    models.imagenet_weights_path("custom_cnn", "/tmp")


def test_chunked_name_attributes_match_keras_reader(tmp_path):
  """Attribute lists over 64 KiB are split as Keras does (layer_names0, 1, ...)."""
  names = [f"layer_with_a_rather_long_name_{i:05d}" for i in range(3000)]
  path = str(tmp_path / "many.h5")
  keras_h5.write_legacy(path, [(n, []) for n in names])
  with h5py.File(path, "r") as f:
    assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
    assert legacy_h5_format.load_attributes_from_hdf5_group(f, "layer_names") == names
  assert list(keras_h5.read(path)) == names


def test_registry_matches_keras_sources():
  vgg, b3 = imagenet.WEIGHT_FILES["vgg16"], imagenet.WEIGHT_FILES["efficientnet_b3"]
  assert vgg.url == keras_vgg16.WEIGHTS_PATH_NO_TOP
  assert f'file_hash="{vgg.md5}"' in inspect.getsource(keras_vgg16)
  assert b3.url == keras_efficientnet.BASE_WEIGHTS_PATH + b3.filename
  assert b3.md5 == keras_efficientnet.WEIGHTS_HASHES["b3"][1]
  assert b3.filename == "efficientnetb3_notop.h5"
  assert vgg.filename == os.path.basename(vgg.url)


@pytest.fixture
def fake_registry(weight_file, monkeypatch, tmp_path):
  """Points 'efficientnet_b3' at a local file:// URL with the right md5; no Keras cache."""
  spec = imagenet.WeightFile("small_notop.h5", "file://" + weight_file,
                             imagenet.md5sum(weight_file))
  monkeypatch.setitem(imagenet.WEIGHT_FILES, "efficientnet_b3", spec)
  monkeypatch.setattr(imagenet, "KERAS_CACHE_DIR", str(tmp_path / "no_keras_cache"))
  return spec


def test_download_verifies_md5_and_caches(fake_registry, weight_file, tmp_path):
  cache = tmp_path / "cache"
  path = models.imagenet_weights_path("efficientnet_b3", str(cache))
  assert path == str(cache / "small_notop.h5")
  assert imagenet.md5sum(path) == fake_registry.md5
  assert sorted(os.listdir(cache)) == ["small_notop.h5"]  # No partial files left.
  os.remove(weight_file)  # Now offline for this URL: the cache must suffice.
  assert models.imagenet_weights_path("efficientnet_b3", str(cache)) == path


def test_download_with_wrong_md5_leaves_nothing(fake_registry, monkeypatch, tmp_path):
  monkeypatch.setitem(imagenet.WEIGHT_FILES, "efficientnet_b3",
                      fake_registry.__class__(fake_registry.filename, fake_registry.url, "0" * 32))
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="md5"):
    models.imagenet_weights_path("efficientnet_b3", str(cache))
  assert os.listdir(cache) == []


def test_corrupted_cached_file_is_refused(fake_registry, tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / fake_registry.filename).write_bytes(b"partial download")
  with pytest.raises(ValueError, match="truncated or not the right file"):
    models.imagenet_weights_path("efficientnet_b3", str(cache))


def test_offline_error_says_which_file_to_put_where(fake_registry, monkeypatch, tmp_path):
  # Port 9 (discard) on localhost refuses connections: an offline machine.
  monkeypatch.setitem(imagenet.WEIGHT_FILES, "efficientnet_b3", imagenet.WeightFile(
      fake_registry.filename, "http://127.0.0.1:9/small_notop.h5", fake_registry.md5))
  cache = tmp_path / "cache"
  with pytest.raises(FileNotFoundError) as err:
    models.imagenet_weights_path("efficientnet_b3", str(cache))
  message = str(err.value)
  assert str(cache / fake_registry.filename) in message
  assert fake_registry.md5 in message and "http://127.0.0.1:9/small_notop.h5" in message
  assert os.listdir(cache) == []
