"""Keras-layer -> NNX-variable conversion plans, and their all-or-nothing application.

A backbone describes, for every Keras layer with weights, which of its
variables receives each Keras weight (in Keras' legacy weight order) and how
the array is transformed. `apply` checks the whole file against the plan --
every layer present, no unexpected layer, weight counts, weight names and
shapes -- before it assigns anything, so a wrong or truncated file never
leaves a half-loaded model.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from affectjax.models.keras_h5 import WeightFileError


@dataclasses.dataclass(frozen=True)
class Target:
  """Destination of one Keras weight: the variable (None = read but unused), accepted names.

  `transform` maps the Keras array to the variable's layout, `inverse` back
  (used by `export`).
  """
  variable: nnx.Variable | None
  names: tuple[str, ...]
  transform: Callable[[np.ndarray], np.ndarray] = lambda a: a
  inverse: Callable[[np.ndarray], np.ndarray] = lambda a: a


def conv(module: nnx.Conv) -> list[Target]:
  """Keras Conv2D: kernel (kh, kw, in, out) is already Flax's HWIO layout."""
  out = [Target(module.kernel, ("kernel",))]
  if module.bias is not None:
    out.append(Target(module.bias, ("bias",)))
  return out


def depthwise_conv(module: nnx.Conv) -> list[Target]:
  """Keras DepthwiseConv2D (multiplier 1): (kh, kw, C, 1) -> grouped conv (kh, kw, 1, C)."""
  def to_grouped(a):
    if a.ndim != 4 or a.shape[3] != 1:
      raise WeightFileError(f"depthwise kernel of shape {a.shape}: expected (kh, kw, C, 1).")
    return np.transpose(a, (0, 1, 3, 2))
  to_keras = lambda a: np.transpose(a, (0, 1, 3, 2))
  return [Target(module.kernel, ("depthwise_kernel", "kernel"), to_grouped, to_keras)]


def batch_norm(module: nnx.BatchNorm) -> list[Target]:
  """Keras BatchNormalization legacy order: gamma, beta, moving_mean, moving_variance."""
  return [Target(module.scale, ("gamma",)), Target(module.bias, ("beta",)),
          Target(module.mean, ("moving_mean",)),
          Target(module.var, ("moving_variance",))]


def _short_name(weight_name: str) -> str | None:
  """'block1_conv1/kernel:0' -> 'kernel'; Keras 3 index names ('0') -> None."""
  if weight_name.isdigit():
    return None
  return weight_name.split("/")[-1].split(":")[0]


def _resolve(name: str, file_layers, auto_named: frozenset[str]) -> str | None:
  if name in file_layers:
    return name
  if name in auto_named:
    # Keras numbers auto-named layers per session: normalization_3 etc.
    matches = [n for n in file_layers if re.fullmatch(rf"{re.escape(name)}_\d+", n)]
    if len(matches) == 1:
      return matches[0]
  return None


def apply(plan: dict[str, list[Target]], file_layers: dict, path: str, *,
          auto_named=frozenset()) -> None:
  """Assigns `file_layers` (from keras_h5.read) to the plan's variables, or raises.

  Raises WeightFileError (naming `path`, the layer and the problem) if any
  plan layer is missing, any file layer with weights is not in the plan, or
  any count, name or shape differs. Nothing is assigned unless all checks pass.
  """
  resolved = {name: _resolve(name, file_layers, frozenset(auto_named)) for name in plan}
  missing = [n for n, r in resolved.items() if r is None]
  used = set(resolved.values())
  extra = [n for n, w in file_layers.items() if w and n not in used]
  if missing or extra:
    raise WeightFileError(
        f"{path} does not match this model: missing layers {missing[:8]}"
        f"{' ...' if len(missing) > 8 else ''}, unexpected layers {extra[:8]}"
        f"{' ...' if len(extra) > 8 else ''}. Use the architecture's "
        "'include_top=False' (_notop) Keras file.")
  updates = []
  for name, targets in plan.items():
    weights = file_layers[resolved[name]]
    if len(weights) != len(targets):
      raise WeightFileError(
          f"{path}: layer {resolved[name]!r} has {len(weights)} weights, the model "
          f"expects {len(targets)} ({[t.names[0] for t in targets]}).")
    for (weight_name, array), target in zip(weights, targets):
      short = _short_name(weight_name)
      if short is not None and short not in target.names:
        raise WeightFileError(
            f"{path}: layer {resolved[name]!r} weight {weight_name!r} is where the "
            f"model expects {target.names[0]!r}; wrong weight order or wrong file.")
      if target.variable is None:
        continue
      value = np.asarray(target.transform(np.asarray(array)))
      expected = tuple(target.variable.shape)
      if value.shape != expected:
        raise WeightFileError(
            f"{path}: layer {resolved[name]!r} weight {weight_name!r} has shape "
            f"{value.shape} (after conversion), the model expects {expected}; "
            "the file is for a different architecture or width.")
      updates.append((target.variable, value))
  for variable, value in updates:
    variable.set_value(jnp.asarray(value, dtype=variable.dtype))


def export(plan: dict[str, list[Target]]) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
  """The inverse of `apply`: the plan's variables as Keras legacy layers (for keras_h5.write_legacy).

  Weight names follow the official files ('<layer>/<name>:0'); unused Keras
  weights (the Normalization layer's sample count) are written as 0.
  """
  out = []
  for layer, targets in plan.items():
    weights = []
    for t in targets:
      value = (np.zeros((), np.int64) if t.variable is None
               else np.asarray(t.inverse(np.asarray(t.variable[...]))))
      weights.append((f"{layer}/{t.names[0]}:0", value))
    out.append((layer, weights))
  return out
