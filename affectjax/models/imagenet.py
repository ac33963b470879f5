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


def load(model, path: str, *, imagenet_rescale: bool = True):
  """Loads a Keras notop weight file (legacy .h5 or Keras 3 .weights.h5) into model.backbone.

  Args:
    model: a MultitaskModel (or a bare backbone) from `models.create`.
    path: the weight file.
    imagenet_rescale: EfficientNet only. True for the official ImageNet file
      (and files saved from a Keras model built with weights='imagenet'), whose
      stem has Keras' extra Rescaling(1/sqrt(std)); False for weights of a
      Keras model built with weights=None or a path.

  The head keeps its initialization. Nothing is assigned unless the whole
  file matches (see keras_plan.apply).
  """
  backbone = getattr(model, "backbone", model)
  if not hasattr(backbone, "keras_weight_plan"):
    raise ValueError(f"{type(backbone).__name__} has no Keras/ImageNet weights; "
                     "use config.model.init='scratch' for it.")
  file_layers = keras_h5.read(path)
  keras_plan.apply(backbone.keras_weight_plan(), file_layers, path,
                   auto_named=getattr(backbone, "keras_auto_named", frozenset()))
  backbone.after_keras_load(imagenet_rescale=imagenet_rescale)
  return model
