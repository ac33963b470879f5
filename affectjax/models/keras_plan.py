"""Keras-layer -> NNX-variable conversion plans, matched to a weight file the way Keras does.

A backbone describes, in the order of `keras.applications`' `model.layers`,
every Keras layer that has weights: its Keras class, and which variable
receives each of its weights (in Keras' legacy order: trainable, then
non-trainable) and how the array is transformed.

`convert` matches a file (keras_h5.read) to the plan with Keras' own rules,
and returns the converted arrays without touching the model:

- Legacy `.h5` (keras/src/legacy/saving/legacy_h5_format.py,
  `load_weights_from_hdf5_group`): the file's layers with a non-empty
  `weight_names`, in `layer_names` order, are paired by position with the
  model's layers that have weights. The two counts must be equal, each pair
  must have the same number of weights, and every array must have the
  model's shape. Layer and weight names are never compared: the official
  VGG16 file is from Keras 1 (`block1_conv1_W_1:0`), EfficientNet's from
  TF-Keras 2 (`stem_conv/kernel:0`), and Keras accepts both. Weights in a
  `top_level_model_weights` group must match the model's own variables
  (none here).
- Keras 3 `.weights.h5` (keras/src/saving/saving_lib.py): a layer is found by
  its group key, its class in snake case plus its rank among the model's
  layers of that class (`conv2d`, `conv2d_1`, ...); its variable count and
  shapes must match. Groups the model does not ask for are ignored, as Keras
  does (with a warning here).

Where Keras would raise, `WeightFileError` names the file, the layer (as the
model and as the file call it) and what to do; names only enrich that
message. Everything is checked before anything is returned, so a wrong file
never leaves a half-loaded model.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np
from flax import nnx

from affectjax.models import keras_h5
from affectjax.models.keras_h5 import WeightFileError

_identity = lambda a: a


@dataclasses.dataclass(frozen=True)
class Target:
  """Destination of one Keras weight.

  variable: the NNX variable, or None for a Keras weight that is read and
    shape-checked but not used (the Normalization layer's sample count).
  name: the Keras weight name ('kernel', 'gamma', ...), for messages and export.
  transform / inverse: Keras array layout -> variable layout, and back.
  unused_shape: the Keras shape of an unused weight (variable None).
  """
  variable: nnx.Variable | None
  name: str
  transform: Callable[[np.ndarray], np.ndarray] = _identity
  inverse: Callable[[np.ndarray], np.ndarray] = _identity
  unused_shape: tuple[int, ...] = ()

  def keras_shape(self) -> tuple[int, ...]:
    """The shape Keras' own variable has, which the file's array must have."""
    if self.variable is None:
      return tuple(self.unused_shape)
    # A zero-stride view: the inverse transform's shape without allocating.
    return tuple(self.inverse(np.broadcast_to(np.float32(0), self.variable.shape)).shape)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One Keras layer with weights: its class in snake case ('conv2d') and its targets."""
  keras_class: str
  targets: list[Target]


Plan = dict[str, Layer]  # Keras layer name -> Layer, in Keras' model.layers order.


def conv(module: nnx.Conv) -> Layer:
  """Keras Conv2D: kernel (kh, kw, in, out) is already Flax's HWIO layout."""
  targets = [Target(module.kernel, "kernel")]
  if module.bias is not None:
    targets.append(Target(module.bias, "bias"))
  return Layer("conv2d", targets)


def _depthwise_to_keras(a):
  return np.transpose(a, (0, 1, 3, 2))


def depthwise_conv(module: nnx.Conv) -> Layer:
  """Keras DepthwiseConv2D (multiplier 1): (kh, kw, C, 1) -> grouped conv (kh, kw, 1, C)."""
  return Layer("depthwise_conv2d", [Target(module.kernel, "depthwise_kernel",
                                           _depthwise_to_keras, _depthwise_to_keras)])


def batch_norm(module: nnx.BatchNorm) -> Layer:
  """Keras BatchNormalization legacy order: gamma, beta, moving_mean, moving_variance."""
  return Layer("batch_normalization", [
      Target(module.scale, "gamma"), Target(module.bias, "beta"),
      Target(module.mean, "moving_mean"), Target(module.var, "moving_variance")])


def _names(layers, limit=8) -> str:
  names = [getattr(layer, "name", layer) for layer in layers]
  return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


def _pair_legacy(plan: Plan, weights: keras_h5.KerasWeights):
  """Keras' legacy rule: weighted layers paired by position; counts must agree."""
  path = weights.path
  if weights.top_level_weights:
    raise WeightFileError(
        f"{path} has {weights.top_level_weights} top-level model weights "
        "('top_level_model_weights'); a keras.applications backbone has none. "
        "It is a weight file of a different (subclassed) model.")
  file_layers = weights.weighted_layers()
  if len(file_layers) != len(plan):
    file_names = [layer.name for layer in file_layers]
    missing = [n for n in plan if n not in file_names]
    extra = [n for n in file_names if n not in plan]
    hint = ""
    if missing or extra:
      hint = (f" By name, the file lacks {_names(missing)} and has "
              f"{_names(extra)} that the model does not.")
    raise WeightFileError(
        f"{path} does not match this model: it has {len(file_layers)} layers with "
        f"weights, the model has {len(plan)} (Keras loads by order and requires "
        f"equal counts).{hint} Use the architecture's 'include_top=False' "
        "(_notop) Keras file, for this architecture and width.")
  return [(name, layer, file_layer, k) for k, ((name, layer), file_layer)
          in enumerate(zip(plan.items(), file_layers))]


def _pair_keras3(plan: Plan, weights: keras_h5.KerasWeights):
  """Keras 3's rule: a layer is the group '<class>[_rank]' (rank among its class)."""
  by_key = {layer.key: layer for layer in weights.layers}
  ranks: dict[str, int] = {}
  pairs, used = [], set()
  for name, layer in plan.items():
    rank = ranks.get(layer.keras_class, 0)
    ranks[layer.keras_class] = rank + 1
    key = layer.keras_class if rank == 0 else f"{layer.keras_class}_{rank}"
    file_layer = by_key.get(key)
    if file_layer is None or not file_layer.weights:
      raise WeightFileError(
          f"{weights.path}: layer {name!r} (Keras 3 group 'layers/{key}') has no "
          f"weights in the file, the model expects {len(layer.targets)}. The file "
          "is for a different architecture; use the architecture's "
          "'include_top=False' Keras file.")
    used.add(key)
    pairs.append((name, layer, file_layer, len(pairs)))
  ignored = [l.key for l in weights.layers if l.weights and l.key not in used]
  if ignored:
    logging.warning("%s: ignoring %d Keras 3 layer groups the model has no layer for "
                    "(as Keras does): %s", weights.path, len(ignored), _names(ignored))
  return pairs


def convert(plan: Plan, weights: keras_h5.KerasWeights
            ) -> list[tuple[nnx.Variable, np.ndarray]]:
  """(variable, host array in the variable's dtype) for every plan target, or raises.

  Pairs file layers with plan layers by Keras' rule for the file's layout
  (see the module docstring), then checks weight counts and shapes. Raises
  WeightFileError naming the file, the layer and what to do; touches no
  variable (abstract `nnx.eval_shape` models work: only shapes are read).
  """
  if weights.layout == keras_h5.KERAS3:
    pairs = _pair_keras3(plan, weights)
  else:
    pairs = _pair_legacy(plan, weights)
  path = weights.path
  out = []
  for name, layer, file_layer, k in pairs:
    where = f"layer #{k} {name!r}" + (
        "" if file_layer.name == name else f" (named {file_layer.name!r} in the file)")
    if len(file_layer.weights) != len(layer.targets):
      raise WeightFileError(
          f"{path}: {where} has {len(file_layer.weights)} weights in the file, the "
          f"model expects {len(layer.targets)} ({[t.name for t in layer.targets]}). "
          "The file is for a different architecture or its layers are out of "
          "order; use the architecture's official _notop Keras file.")
    for (weight_name, array), target in zip(file_layer.weights, layer.targets):
      expected = target.keras_shape()
      if tuple(array.shape) != expected:
        raise WeightFileError(
            f"{path}: {where} weight {weight_name!r} has shape {tuple(array.shape)}, "
            f"the model's {target.name!r} needs {expected}. The file is for a "
            "different architecture or width (ImageNet weights need the default "
            "width/depth kwargs), or its layers are out of order.")
      if target.variable is not None:
        value = np.require(target.transform(array), target.variable.dtype, "C")
        out.append((target.variable, value))
  return out


def export(plan: Plan) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
  """The inverse of `convert`: the plan's variables as Keras legacy layers (for keras_h5.write_legacy).

  Weight names follow the TF-Keras 2 files ('<layer>/<name>:0'); unused Keras
  weights (the Normalization layer's sample count) are written as 0.
  """
  out = []
  for name, layer in plan.items():
    weights = []
    for t in layer.targets:
      value = (np.zeros(t.unused_shape, np.int64) if t.variable is None
               else np.asarray(t.inverse(np.asarray(t.variable[...]))))
      weights.append((f"{name}/{t.name}:0", value))
    out.append((name, weights))
  return out
