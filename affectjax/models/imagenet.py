"""Official Keras ImageNet weight files: where they come from, caching, md5, loading.

The files are the ones `keras.applications` downloads (URLs and md5 hashes
copied from keras/src/applications/{vgg16,efficientnet}.py). They are cached
in `config.model.weights_dir`; a file already in Keras' own cache
(~/.keras/models) is used as is. Every file is md5-checked before use, so a
truncated download or a different file is refused with a clear message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.request

import jax
import numpy as np
from flax import nnx

from affectjax.models import keras_h5
from affectjax.models import keras_plan


@dataclasses.dataclass(frozen=True)
class WeightFile:
  filename: str
  url: str
  md5: str


WEIGHT_FILES = {
    "vgg16": WeightFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc"),
    "efficientnet_b3": WeightFile(
        "efficientnetb3_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb3_notop.h5",
        "af6d107764bb5b1abb91932881670226"),
}
KERAS_CACHE_DIR = os.path.join("~", ".keras", "models")
_DOWNLOAD_TIMEOUT_S = 60


def md5sum(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _check_md5(path: str, spec: WeightFile) -> None:
  actual = md5sum(path)
  if actual != spec.md5:
    raise ValueError(
        f"{path} has md5 {actual}, but the official {spec.filename} has md5 "
        f"{spec.md5}: the file is truncated or not the right file. Delete it and "
        f"download it again from {spec.url}")


def _download(spec: WeightFile, dest: str) -> None:
  """Downloads to a temporary file next to `dest`, checks md5, then renames."""
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".part", dir=os.path.dirname(dest))
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
        spec.url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
      shutil.copyfileobj(response, out, 1 << 20)
    _check_md5(tmp, spec)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def weights_path(name: str, weights_dir: str) -> str:
  """Path of the md5-verified official notop file for model `name`.

  Looks in `weights_dir`, then in Keras' cache (~/.keras/models), then
  downloads into `weights_dir`. Offline, raises FileNotFoundError that says
  which file to put where.
  """
  if name not in WEIGHT_FILES:
    raise ValueError(f"No ImageNet weights for model {name!r} (config.model.name "
                     f"with config.model.init='imagenet'); available: "
                     f"{', '.join(WEIGHT_FILES)}.")
  spec = WEIGHT_FILES[name]
  weights_dir = os.path.expanduser(weights_dir)
  dest = os.path.join(weights_dir, spec.filename)
  for candidate in (dest, os.path.join(os.path.expanduser(KERAS_CACHE_DIR), spec.filename)):
    if os.path.isfile(candidate):
      _check_md5(candidate, spec)
      return candidate
  try:
    _download(spec, dest)
  except ValueError:
    raise
  except OSError as e:  # URLError, timeouts and socket errors are OSErrors.
    raise FileNotFoundError(
        f"ImageNet weights for {name!r} are not cached and could not be "
        f"downloaded ({type(e).__name__}: {e}). Put the official file "
        f"{spec.filename} (md5 {spec.md5}) at {dest} -- e.g. on a machine "
        f"with internet: curl -L -o {spec.filename} {spec.url} -- or set "
        "config.model.weights_dir to the folder that holds it.") from e
  return dest


def _backbone(model):
  backbone = getattr(model, "backbone", model)
  if not hasattr(backbone, "keras_weight_plan"):
    raise ValueError(f"{type(backbone).__name__} has no Keras/ImageNet weights; "
                     "use config.model.init='scratch' for it.")
  return backbone


def _converted(model, path: str, imagenet_rescale: bool):
  """[(variable, host array)] for every backbone variable, from the file at `path`."""
  backbone = _backbone(model)
  updates = keras_plan.convert(backbone.keras_weight_plan(), keras_h5.read(path))
  return updates + list(backbone.keras_extra_values(imagenet_rescale=imagenet_rescale))


def load_arrays(model, path: str, *, imagenet_rescale: bool = True
                ) -> dict[tuple, np.ndarray]:
  """The converted backbone weights as host numpy arrays, keyed like the model's state.

  Args:
    model: a MultitaskModel (or a bare backbone) from `models.create`; an
      abstract one from `nnx.eval_shape(...)` is enough (only shapes and
      dtypes are read) and is not modified.
    path: a Keras notop weight file (legacy .h5 in any Keras generation's
      naming, or Keras 3 .weights.h5).
    imagenet_rescale: see `load`.

  Returns:
    {state path: array}, where a state path is the key tuple of
    `nnx.to_flat_state(nnx.state(model))` (e.g. ('backbone', 'blocks', 0, 0,
    'kernel')), one entry per backbone variable, in the variable's dtype.
    Nothing is placed on a device: put the whole train state on the mesh
    once (see `merge_arrays`).
  """
  paths = {id(v): p for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
  return {paths[id(variable)]: value
          for variable, value in _converted(model, path, imagenet_rescale)}


def merge_arrays(states, arrays: dict[tuple, np.ndarray]):
  """`states` (an nnx.State, a pure dict, or a tuple of them, e.g. (params, rest)) with `arrays` swapped in.

  Leaves whose path is in `arrays` are replaced by the host array; the rest
  are kept as they are (e.g. the head's jitted initialization, already on
  the mesh). Raises ValueError if an array matches no leaf or a shape
  differs, so a wrong split cannot silently drop weights. Follow with one
  `jax.device_put(result, shardings)`.
  """
  used = set()

  def swap(state):
    def leaf(key_path, value):
      # DictKey path entries; a Variable's own GetAttrKey('value') is skipped.
      key = tuple(k.key for k in key_path if hasattr(k, "key"))
      if key not in arrays:
        return value
      if tuple(value.shape) != arrays[key].shape:
        raise ValueError(f"merge_arrays: {key} has shape {tuple(value.shape)}, "
                         f"the converted array {arrays[key].shape}.")
      used.add(key)
      return arrays[key]
    return jax.tree_util.tree_map_with_path(leaf, state)

  out = tuple(swap(s) for s in states) if isinstance(states, tuple) else swap(states)
  unused = [k for k in arrays if k not in used]
  if unused:
    raise ValueError(f"merge_arrays: {len(unused)} converted arrays match no leaf of "
                     f"the given states, e.g. {unused[:3]}; pass every partition "
                     "of the model's state (e.g. (params, rest)).")
  return out


def load(model, path: str, *, imagenet_rescale: bool = True):
  """Loads a Keras notop weight file (legacy .h5 or Keras 3 .weights.h5) into model.backbone.

  Args:
    model: a MultitaskModel (or a bare backbone) from `models.create`.
    path: the weight file. Matched to the model the way Keras' own loader
      does (keras_plan): by order and shape, whatever the weight names.
    imagenet_rescale: EfficientNet only. True for the official ImageNet file
      (and files saved from a Keras model built with weights='imagenet'), whose
      stem has Keras' extra Rescaling(1/sqrt(std)); False for weights of a
      Keras model built with weights=None or a path.

  Every backbone variable gets a host numpy array (no device transfer, so a
  caller can place the whole state once); the head keeps its
  initialization. Nothing is assigned unless the whole file matches.
  """
  for variable, value in _converted(model, path, imagenet_rescale):
    variable.set_value(value)
  return model
