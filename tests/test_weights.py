"""Weight files: the cache/download/md5 logic and the all-or-nothing loader's errors.

Uses a shrunken EfficientNet (same code path as B3) so files stay small; the
VGG16/EfficientNet-B3 numerical parity with Keras is in test_keras_parity.py.
"""
import inspect
import os
import re

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
from affectjax.models import keras_reference

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
      var.set_value(rng.uniform(0.5, 1.5, var.shape).astype(var.dtype))
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


# --------------------------------------------------------------------------
# The loading rule is Keras' own: each file variant below gets the same
# verdict from Keras' loader (`model.load_weights` on the same architecture,
# built by Keras' EfficientNet builder) as from ours; where both accept,
# both hold the same values.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_small():
  return keras_reference.build_efficientnet(
      SMALL["width_coefficient"], SMALL["depth_coefficient"], 32)


def _keras_values(keras_model):
  """Every weight of every layer, in Keras' legacy order (the file order)."""
  return [np.asarray(w.numpy()) for layer in keras_model.layers
          for w in layer.trainable_weights + layer.non_trainable_weights]


def _our_values(model):
  """Our backbone's variables exported to Keras' layout, in plan (= Keras layer) order."""
  return [a for _, ws in keras_plan.export(model.backbone.keras_weight_plan()) for _, a in ws]


def _renamed(layers, weight_name):
  return [(name, [(weight_name(name, k, w), a) for k, (w, a) in enumerate(ws)])
          for name, ws in layers]


def _keras1(layers, path):
  """Keras 1 names ('stem_conv_W_1:0') and attributes, written as Keras 1.2 did."""
  short = {"kernel": "W", "bias": "b", "depthwise_kernel": "depthwise_W",
           "moving_mean": "running_mean", "moving_variance": "running_std"}
  keras_reference.write_keras1_h5(path, [("input_1", [])] + _renamed(
      layers, lambda n, k, w: f"{n}_{short.get(w.split('/')[-1][:-2], w.split('/')[-1][:-2])}_1:0"))


def _write(layers, path):
  keras_h5.write_legacy(path, layers)


def _swap_in(layers, name, i, j):
  out = []
  for n, ws in layers:
    if n == name:
      ws = list(ws)
      ws[i], ws[j] = ws[j], ws[i]
    out.append((n, ws))
  return out


def _swap_layers(layers, a, b):
  names = [n for n, _ in layers]
  i, j = names.index(a), names.index(b)
  layers = list(layers)
  layers[i], layers[j] = layers[j], layers[i]
  return layers


def _with_top_level_weight(layers, path):
  _write(layers, path)
  with h5py.File(path, "a") as f:
    group = f.create_group("top_level_model_weights")
    group.attrs["weight_names"] = np.array([b"seed_generator/state"])
    group.create_dataset("seed_generator/state", data=np.zeros(2, np.uint32))


ACCEPTED = {
    "tf_keras2_names": lambda layers, path: _write(layers, path),
    "keras1_names_and_attributes": _keras1,
    "meaningless_layer_and_weight_names": lambda layers, path: _write(
        [(f"layer_{i}", [(f"w{k}", a) for k, (_, a) in enumerate(ws)])
         for i, (_, ws) in enumerate(layers)], path),
    "weightless_layers_between": lambda layers, path: _write(
        [("input_1", [])] + layers[:5] + [("block1a_se_squeeze", [])] + layers[5:]
        + [("flatten", [])], path),
    # Same shapes: Keras loads by position, so gamma receives the file's beta.
    "same_shape_weights_swapped": lambda layers, path: _write(
        _swap_in(layers, "stem_bn", 0, 1), path),
}
REJECTED = {
    "include_top_layer": (
        lambda layers, path: _write(layers + [("predictions", [
            ("predictions/kernel:0", np.zeros((8, 4), np.float32))])], path),
        r"has 60 layers with weights, the model has 59.*has \['predictions'\].*_notop"),
    "missing_layer": (
        lambda layers, path: _write([l for l in layers if l[0] != "top_bn"], path),
        r"has 58 layers with weights, the model has 59.*lacks \['top_bn'\]"),
    "weight_missing_in_a_layer": (
        lambda layers, path: _write([(n, ws[:3] if n == "stem_bn" else ws)
                                     for n, ws in layers], path),
        r"layer #2 'stem_bn' has 3 weights in the file, the model expects 4"),
    "layers_out_of_order": (
        lambda layers, path: _write(_swap_layers(
            layers, "block1a_se_reduce", "block1a_se_expand"), path),
        r"'block1a_se_reduce' \(named 'block1a_se_expand' in the file\) weight "
        r"'block1a_se_expand/kernel:0' has shape \(1, 1, 2, 8\).*needs \(1, 1, 8, 2\)"),
    "top_level_weights": (_with_top_level_weight, "top-level model weights"),
}


def _keras_loads(keras_model, path) -> bool:
  try:
    keras_model.load_weights(path)
  except ValueError:
    return False
  return True


@pytest.mark.parametrize("variant", sorted(ACCEPTED))
def test_file_keras_accepts_loads_the_same_values(variant, source, keras_small, tmp_path):
  path = str(tmp_path / "small_notop.h5")
  ACCEPTED[variant](list(source[1]), path)
  assert _keras_loads(keras_small, path)
  target = small_effnet(1)
  models.load_imagenet_weights(target, path, imagenet_rescale=False)
  ours, theirs = _our_values(target), _keras_values(keras_small)
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", sorted(REJECTED))
def test_file_keras_refuses_is_refused_naming_the_problem(variant, source, keras_small,
                                                          tmp_path):
  write, match = REJECTED[variant]
  path = str(tmp_path / "small_notop.h5")
  write(list(source[1]), path)
  assert not _keras_loads(keras_small, path)
  _assert_rejected(path, re.escape(path) + ".*" + match)


def test_other_width_is_refused_by_shape_like_keras(keras_small, tmp_path):
  other = small_effnet(2, width_coefficient=0.2)
  path = str(tmp_path / "wider.h5")
  keras_h5.write_legacy(path, keras_plan.export(other.backbone.keras_weight_plan()))
  assert not _keras_loads(keras_small, path)
  _assert_rejected(path, r"has shape \(.*\), the model's 'kernel' needs .* width")


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_keras3_file_loads_by_class_rank_not_by_name(source, keras_small, tmp_path):
  """Keras 3 finds a layer by its group 'layers/<class>_<rank>'; the name attribute is a label."""
  legacy = str(tmp_path / "small_notop.h5")
  keras_h5.write_legacy(legacy, source[1])
  keras_small.load_weights(legacy)
  path = str(tmp_path / "small.weights.h5")
  keras_small.save_weights(path)
  with h5py.File(path, "a") as f:  # Labels Keras never reads.
    for group in f["layers"].values():
      if "vars" in group and "name" in group["vars"].attrs:
        group["vars"].attrs["name"] = "renamed"
  assert _keras_loads(keras_small, path)
  target = small_effnet(1)
  models.load_imagenet_weights(target, path, imagenet_rescale=False)
  for a, b in zip(_our_values(target), _keras_values(keras_small)):
    np.testing.assert_array_equal(a, b)
  with h5py.File(path, "a") as f:  # A layer with no variables where Keras expects 4.
    for key in list(f["layers/batch_normalization_2/vars"]):
      del f["layers/batch_normalization_2/vars"][key]
  assert not _keras_loads(keras_small, path)
  _assert_rejected(path, r"'layers/batch_normalization_2'\) has no weights in the file, "
                   "the model expects 4")


def test_load_arrays_are_host_arrays_keyed_like_the_state(weight_file):
  """load_arrays needs only an abstract model; merge_arrays + one device_put equals load."""
  abstract = nnx.eval_shape(lambda: models.create("efficientnet_b3", rngs=nnx.Rngs(0), **SMALL))
  arrays = imagenet.load_arrays(abstract, weight_file)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  backbone_paths = {p for p, _ in nnx.to_flat_state(nnx.state(abstract.backbone))}
  assert {p[1:] for p in arrays} == backbone_paths and all(p[0] == "backbone" for p in arrays)
  assert all(type(a) is np.ndarray for a in arrays.values())
  # The trainer's way: an init already on the mesh (here: 7s; a jitted Flax
  # init of even this model costs ~30 s of CPU to compile), the converted
  # arrays swapped in, the whole state placed once.
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ("data",)), jax.sharding.PartitionSpec())
  init = jax.device_put(jax.tree.map(lambda s: np.full(s.shape, 7, s.dtype), (params, rest)),
                        replicated)
  merged = jax.device_put(imagenet.merge_arrays(init, arrays), replicated)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(merged))
  # load_imagenet_weights on a model holding device arrays: host arrays replace
  # them (no per-array device transfer); the caller places the state once.
  loaded = models.load_imagenet_weights(nnx.merge(graphdef, *init, copy=True), weight_file)
  for leaf in jax.tree.leaves(nnx.state(loaded.backbone)):
    assert type(leaf) is np.ndarray, type(leaf)
  merged_model = nnx.merge(graphdef, *merged)
  assert_tree_equal(backbone_state(loaded), backbone_state(merged_model))
  assert_tree_equal(nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, *init).head)),
                    nnx.to_pure_dict(nnx.state(merged_model.head)))  # Head untouched.
  with pytest.raises(ValueError, match="match no leaf"):
    imagenet.merge_arrays(init[0], arrays)  # Only params: BatchNorm statistics lost.


def test_models_without_imagenet_weights_say_so(weight_file):
  cnn = nnx.eval_shape(lambda: models.create("custom_cnn", rngs=nnx.Rngs(0), widths=(4,)))
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
  assert [layer.name for layer in keras_h5.read(path).layers] == names


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
