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


def build(name: str, size: int, *, imagenet_graph: bool = False, weights_path=None):
  """keras.applications.<name>(include_top=False) at `size` px, without downloading.

  imagenet_graph: build the weights='imagenet' graph (for EfficientNet it has
    the extra Rescaling(1/sqrt(std)) layer). Weights are then loaded from
    `weights_path` if given, else left at zero.
  Initializers return zeros: Keras' random initializers compile one XLA
  program per weight shape (~40 s for EfficientNetB3 on 2 cores), and every
  weight is overwritten anyway.
  """
  import keras  # pylint: disable=g-import-not-at-top
  from keras.src import initializers  # pylint: disable=g-import-not-at-top
  from keras.src.models import functional  # pylint: disable=g-import-not-at-top
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top

  fn = getattr(keras.applications, KERAS_APPS[name])
  zeros = lambda self, shape, dtype=None: np.zeros(shape, dtype or "float32")
  with contextlib.ExitStack() as stack:
    stack.enter_context(_patched(initializers.VarianceScaling, "__call__", zeros))
    if not imagenet_graph:
      return fn(include_top=False, weights=None, input_shape=(size, size, 3))
    stack.enter_context(_patched(file_utils, "get_file", lambda *a, **k: weights_path))
    if weights_path is None:
      stack.enter_context(_patched(functional.Functional, "load_weights",
                                   lambda *a, **k: None))
    return fn(include_top=False, weights="imagenet", input_shape=(size, size, 3))


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


def legacy_layers(model):
  """A Keras model's weights in the legacy layout and naming of the official files.

  Per layer: trainable then non-trainable weights (Keras' legacy order), named
  TF-Keras style '<layer>/<weight>:0' (DepthwiseConv2D's kernel was named
  'depthwise_kernel' there). Feed to keras_h5.write_legacy.
  """
  import keras  # pylint: disable=g-import-not-at-top
  out = []
  for layer in model.layers:
    weights = []
    for w in layer.trainable_weights + layer.non_trainable_weights:
      name = w.path.split("/")[-1]
      if isinstance(layer, keras.layers.DepthwiseConv2D) and name == "kernel":
        name = "depthwise_kernel"
      weights.append((f"{layer.name}/{name}:0", np.asarray(w.numpy())))
    out.append((layer.name, weights))
  return out


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


def tap_outputs(model, names, inputs, batch_size: int = 2) -> dict[str, np.ndarray]:
  """Outputs of the named layers of a Keras model (e.g. our backbone's intermediates keys)."""
  import keras  # pylint: disable=g-import-not-at-top
  names = list(names)
  sub = keras.Model(model.input, [model.get_layer(n).output for n in names])
  outs = sub.predict(inputs, batch_size=batch_size, verbose=0)
  return dict(zip(names, outs))


def compare_taps(ours: dict, ref: dict) -> dict[str, tuple[float, float]]:
  """relative_errors per tap name (ours and ref must have the same keys)."""
  if set(ours) != set(ref):
    raise ValueError(f"tap names differ: {sorted(set(ours) ^ set(ref))}")
  return {k: relative_errors(ours[k], ref[k]) for k in ours}
