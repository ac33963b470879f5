"""Models for facial affect: three backbones behind one multitask head.

`create(name, rngs=..., ...)` builds `MultitaskModel(backbone, head)` for
name in {'custom_cnn', 'vgg16', 'efficientnet_b3'}. VGG16 and EfficientNet-B3
are layer-for-layer ports of `keras.applications` and load the official Keras
ImageNet files (`load_imagenet_weights`, `imagenet_weights_path`). See
docs/MODELS.md.
"""
from __future__ import annotations

import importlib
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from affectjax.models.head import MultitaskHead
from affectjax.models.multitask import MultitaskModel

# name -> (module, backbone class). Imported lazily so that building the small
# custom CNN never imports the big architectures.
_BACKBONES = {
    "custom_cnn": ("affectjax.models.custom_cnn", "CustomCNN"),
    "vgg16": ("affectjax.models.vgg16", "VGG16"),
    "efficientnet_b3": ("affectjax.models.efficientnet", "EfficientNetB3"),
}
# kwargs (config.model.kwargs) consumed by the head; the rest go to the backbone.
_HEAD_KWARGS = {"dropout": "dropout", "head_hidden": "hidden"}

NAMES = tuple(_BACKBONES)


def _backbone_class(name: str):
  if name not in _BACKBONES:
    raise ValueError(f"Unknown model {name!r} (config.model.name); "
                     f"choose one of {', '.join(NAMES)}.")
  module, cls = _BACKBONES[name]
  return getattr(importlib.import_module(module), cls)


def _as_dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"Unsupported compute dtype {dtype!r} "
                       "(config.model.dtype); use 'float32' or 'bfloat16'.")
    return jnp.dtype(dtype)
  return dtype


def create(name: str, *, rngs: nnx.Rngs, num_classes: int = 8,
           dtype=jnp.float32, **kwargs) -> MultitaskModel:
  """Builds backbone `name` + the multitask head.

  Args:
    name: 'custom_cnn' | 'vgg16' | 'efficientnet_b3'.
    rngs: parameter-init randomness (only 'params' is used; no stream is kept).
    num_classes: number of expression logits.
    dtype: compute dtype ('float32' / 'bfloat16' or a jnp dtype); parameters
      and BatchNorm statistics always stay float32.
    **kwargs: config.model.kwargs. Head: `dropout` (default 0.3),
      `head_hidden` (hidden units, 0 = none, default 256). Backbone:
      custom_cnn `widths`, `convs_per_stage`; efficientnet_b3
      `drop_connect_rate`; vgg16 none.
  """
  dtype = _as_dtype(dtype)
  cls = _backbone_class(name)
  head_kwargs = {_HEAD_KWARGS[k]: v for k, v in kwargs.items() if k in _HEAD_KWARGS}
  backbone_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_KWARGS}
  accepted = [p for p in inspect.signature(cls.__init__).parameters
              if p not in ("self", "dtype", "rngs")]
  unknown = sorted(set(backbone_kwargs) - set(accepted))
  if unknown:
    raise ValueError(
        f"Unknown config.model.kwargs {unknown} for model {name!r}; accepted: "
        f"{sorted(accepted + list(_HEAD_KWARGS))}.")
  backbone = cls(**backbone_kwargs, dtype=dtype, rngs=rngs)
  head = MultitaskHead(backbone.num_features, num_classes=num_classes,
                       dtype=dtype, rngs=rngs, **head_kwargs)
  return MultitaskModel(backbone, head, name)


def preprocess(name: str, images_uint8: jax.Array) -> jax.Array:
  """The preprocessing of a freshly created `name` model (standard ImageNet constants)."""
  return _backbone_class(name).default_preprocess(images_uint8)


def imagenet_weights_path(name: str, weights_dir: str) -> str:
  """Path of the official Keras ImageNet file for `name`, downloading it if needed.

  Offline, raises FileNotFoundError saying which file to put where.
  """
  from affectjax.models import imagenet  # pylint: disable=g-import-not-at-top
  return imagenet.weights_path(name, weights_dir)


def load_imagenet_weights(model: MultitaskModel, path: str, **kwargs) -> MultitaskModel:
  """Loads a Keras ImageNet weight file (legacy .h5 or Keras 3 .weights.h5) into the backbone.

  Every backbone variable is overwritten or a clear error is raised; the head
  keeps its initialization. Returns `model` (modified in place).
  """
  from affectjax.models import imagenet  # pylint: disable=g-import-not-at-top
  return imagenet.load(model, path, **kwargs)
