"""Keras reference models for parity checks (tests and benchmarks/keras_parity_full.py).

Builds `keras.applications` backbones offline, randomizes every weight and
exports weights in the legacy HDF5 layout of the official files. Keras is a
test/bench dependency, so it is imported inside the functions; set
KERAS_BACKEND=jax before calling them.
"""
from __future__ import annotations

import contextlib

import numpy as np

KERAS_APPS = {"vgg16": "VGG16", "efficientnet_b3": "EfficientNetB3"}


@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def build(name: str, size: int, *, imagenet_graph: bool = False, weights_path=None,
          weights_file=None):
  """keras.applications.<name>(include_top=False) at `size` px, without downloading.

  imagenet_graph: build the weights='imagenet' graph (for EfficientNet it has
    the extra Rescaling(1/sqrt(std)) layer). Weights are then loaded from
    `weights_path` if given (by Keras' own code: the download is replaced by
    that path), else left at zero.
  weights_file: instead, `keras.applications.<name>(weights=weights_file)`,
    Keras' path for a user's weight file (no ImageNet rescale for EfficientNet).
  Initializers return zeros: Keras' random initializers compile one XLA
  program per weight shape (tens of seconds for EfficientNetB3 on a small
  CPU), and every weight is overwritten anyway.
  """
  import keras  # pylint: disable=g-import-not-at-top
  from keras.src.models import functional  # pylint: disable=g-import-not-at-top
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top

  fn = getattr(keras.applications, KERAS_APPS[name])
  with contextlib.ExitStack() as stack:
    stack.enter_context(_zero_initializers())
    if not imagenet_graph:
      return fn(include_top=False, weights=weights_file, input_shape=(size, size, 3))
    stack.enter_context(_patched(file_utils, "get_file", lambda *a, **k: weights_path))
    if weights_path is None:
      stack.enter_context(_patched(functional.Functional, "load_weights",
                                   lambda *a, **k: None))
    return fn(include_top=False, weights="imagenet", input_shape=(size, size, 3))


def _zero_initializers():
  """Keras' VarianceScaling initializers return zeros (no per-shape XLA compile)."""
  from keras.src import initializers  # pylint: disable=g-import-not-at-top
  zeros = lambda self, shape, dtype=None: np.zeros(shape, dtype or "float32")
  return _patched(initializers.VarianceScaling, "__call__", zeros)


def build_efficientnet(width_coefficient: float, depth_coefficient: float, size: int):
  """Keras' EfficientNet builder (behind keras.applications.EfficientNetB3) at any width/depth.

  include_top=False, weights=None, zero-initialized: a small model for
  testing the loading rules against Keras' own loader.
  """
  from keras.src.applications import efficientnet  # pylint: disable=g-import-not-at-top
  with _zero_initializers():
    return efficientnet.EfficientNet(
        width_coefficient, depth_coefficient, size, include_top=False,
        weights=None, input_shape=(size, size, 3))


def randomize(model, seed: int) -> None:
  """Overwrites every weight (BN moving stats, Normalization mean/variance too) at a sane scale."""
  import keras  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    for w in layer.weights:
      name, shape = w.path.split("/")[-1], tuple(w.shape)
      if name == "kernel":
        fan_in = shape[0] * shape[1] if depthwise else int(np.prod(shape[:-1]))
        value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
      elif name in ("bias", "beta", "moving_mean"):
        value = rng.normal(0.0, 0.1, shape)
      elif name in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, shape)
      elif name == "mean":  # Normalization layer, 0..1 pixel scale.
        value = rng.uniform(0.3, 0.6, shape)
      elif name == "variance":
        value = rng.uniform(0.03, 0.1, shape)
      elif name == "count":
        continue
      else:
        raise ValueError(f"randomize: unexpected Keras weight {w.path}")
      w.assign(value.astype(np.float32))


# Keras 1 (TensorFlow backend) weight names, as in the official VGG16 file
# ('block1_conv1_W_1:0'); its BatchNormalization had running_mean/running_std.
_KERAS1_NAMES = {"kernel": "W", "bias": "b", "depthwise_kernel": "depthwise_W",
                 "moving_mean": "running_mean", "moving_variance": "running_std"}
NAMINGS = ("keras1", "tf_keras2", "keras3_h5", "keras3")


def _weight_name(layer_name: str, weight: str, naming: str) -> str:
  if naming == "keras1":
    return f"{layer_name}_{_KERAS1_NAMES.get(weight, weight)}_1:0"
  if naming == "tf_keras2":
    return f"{layer_name}/{weight}:0"
  raise ValueError(f"unknown legacy naming {naming!r}")


def legacy_layers(model, naming: str = "tf_keras2"):
  """A Keras model's layers and weights in the legacy layout of the official files.

  Every layer (weightless ones too, with no weights, as the files have them);
  per layer, trainable then non-trainable weights (Keras' legacy order),
  named as Keras generation `naming` did: 'keras1' '<layer>_W_1:0' (the
  VGG16 file), 'tf_keras2' '<layer>/kernel:0' with DepthwiseConv2D's kernel
  called 'depthwise_kernel' (the EfficientNet file). Feed to
  keras_h5.write_legacy or write_keras1_h5.
  """
  import keras  # pylint: disable=g-import-not-at-top
  out = []
  for layer in model.layers:
    weights = []
    for w in layer.trainable_weights + layer.non_trainable_weights:
      name = w.path.split("/")[-1]
      if isinstance(layer, keras.layers.DepthwiseConv2D) and name == "kernel":
        name = "depthwise_kernel"
      weights.append((_weight_name(layer.name, name, naming), np.asarray(w.numpy())))
    out.append((layer.name, weights))
  return out


def write_keras1_h5(path: str, layers) -> None:
  """Writes `layers` as Keras 1.2's `save_weights` did (keras/engine/topology.py).

  Fixed-length byte-string ('S') attributes; `weight_names` stored as given
  (an empty list for weightless layers); keras_version '1.2.2', backend
  'tensorflow'; no `top_level_model_weights` group; datasets directly under
  the layer group ('block1_conv1/block1_conv1_W_1:0').
  """
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode("utf8") for n, _ in layers], dtype="S")
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"1.2.2"
    for layer_name, weights in layers:
      group = f.create_group(layer_name)
      names = [w.encode("utf8") for w, _ in weights]
      group.attrs["weight_names"] = np.array(names, dtype="S") if names else []
      for weight_name, value in weights:
        value = np.asarray(value)
        group.create_dataset(weight_name, value.shape, dtype=value.dtype)[...] = value


def write_weights(model, path: str, naming: str) -> None:
  """Writes a Keras model's weights as Keras generation `naming` (one of NAMINGS) saved them.

  'keras1', 'tf_keras2': legacy .h5 with those generations' weight names and
  attributes; 'keras3_h5': Keras 3's own legacy writer
  (`legacy_h5_format.save_weights_to_hdf5_group`: names like
  'block1_conv1/kernel', a `top_level_model_weights` group); 'keras3':
  `model.save_weights` (`path` must end in .weights.h5).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  from affectjax.models import keras_h5  # pylint: disable=g-import-not-at-top
  if naming == "keras1":
    write_keras1_h5(path, legacy_layers(model, "keras1"))
  elif naming == "tf_keras2":
    keras_h5.write_legacy(path, legacy_layers(model, "tf_keras2"))
  elif naming == "keras3_h5":
    with h5py.File(path, "w") as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
  elif naming == "keras3":
    model.save_weights(path)
  else:
    raise ValueError(f"unknown naming {naming!r}; one of {NAMINGS}")


def keras_preprocess(name: str, images_uint8: np.ndarray) -> np.ndarray:
  """What Keras users feed the model: caffe-preprocessed for VGG16, raw 0..255 for EfficientNet."""
  import keras  # pylint: disable=g-import-not-at-top
  x = np.asarray(images_uint8, np.float32)
  if name == "vgg16":
    return keras.applications.vgg16.preprocess_input(x)
  return x  # EfficientNet's preprocessing is inside the Keras model.


def relative_errors(ours, ref) -> tuple[float, float]:
  """(||ours-ref||_2 / ||ref||_2, max|ours-ref| / max|ref|) in float64."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  diff = ours - ref
  return (float(np.linalg.norm(diff) / np.linalg.norm(ref)),
          float(np.abs(diff).max() / np.abs(ref).max()))


def tap_model(model, names):
  """A Keras model sharing `model`'s layers (and weights) whose outputs are the named layers'.

  Its compiled predict function takes the weights as arguments, so it can be
  reused after `model.load_weights` without compiling again.
  """
  import keras  # pylint: disable=g-import-not-at-top
  return keras.Model(model.input, [model.get_layer(n).output for n in names])


def tap_outputs(model, names, inputs, batch_size: int = 2) -> dict[str, np.ndarray]:
  """Outputs of the named layers of a Keras model (e.g. our backbone's intermediates keys)."""
  names = list(names)
  outs = tap_model(model, names).predict(inputs, batch_size=batch_size, verbose=0)
  return dict(zip(names, outs))


def compare_taps(ours: dict, ref: dict) -> dict[str, tuple[float, float]]:
  """relative_errors per tap name (ours and ref must have the same keys)."""
  if set(ours) != set(ref):
    raise ValueError(f"tap names differ: {sorted(set(ours) ^ set(ref))}")
  return {k: relative_errors(ours[k], ref[k]) for k in ours}
