"""Read (and write) Keras weight files: legacy HDF5 and Keras 3 `.weights.h5`.

Legacy layout (what `keras.applications` downloads, e.g.
`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`, `efficientnetb3_notop.h5`):

  /                        attrs: layer_names = [b"block1_conv1", ...]
  /<layer_name>            attrs: weight_names = [b"block1_conv1/kernel:0", ...]
  /<layer_name>/<weight_name>   dataset (weight_name may contain '/', so it
                                is a path of nested groups)

A full-model save puts the same structure under /model_weights. An attribute
list too big for one HDF5 object header (64 KiB) is split by Keras into
`layer_names0`, `layer_names1`, ...; both readers and the writer handle that.
Within a layer, weights come in Keras' legacy order: trainable weights, then
non-trainable ones (BatchNorm: gamma, beta, moving_mean, moving_variance).

Keras 3 layout (`model.save_weights("x.weights.h5")`):

  /layers/<snake_class_name[_k]>/vars   attrs: name = layer name; datasets 0, 1, ...

Both are returned as {layer_name: [(weight_name, array), ...]} in file order
(Keras 3 weights are unnamed: their names are "0", "1", ...).
"""
from __future__ import annotations

import os
import tempfile

import h5py
import numpy as np

# HDF5 object headers hold at most 64 KiB of attributes (Keras' constant).
_HDF5_ATTR_LIMIT = 64512


class WeightFileError(ValueError):
  """A weight file that cannot be read or does not fit the model."""


def _decode(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _read_name_list(group: h5py.Group, name: str) -> list[str]:
  """Reads a (possibly chunked: name0, name1, ...) string-list attribute."""
  if name in group.attrs:
    return [_decode(v) for v in group.attrs[name]]
  out, k = [], 0
  while f"{name}{k}" in group.attrs:
    out.extend(_decode(v) for v in group.attrs[f"{name}{k}"])
    k += 1
  return out


def _write_name_list(group: h5py.Group, name: str, values: list[str]) -> None:
  """Writes a string-list attribute, split into name0, name1, ... if too large."""
  data = np.asarray([v.encode("utf8") for v in values])
  chunks = 1
  while any(c.nbytes > _HDF5_ATTR_LIMIT for c in np.array_split(data, chunks)):
    chunks += 1
  if chunks == 1:
    group.attrs[name] = data
  else:
    for k, chunk in enumerate(np.array_split(data, chunks)):
      group.attrs[f"{name}{k}"] = chunk


def _read_legacy(root: h5py.Group, path: str):
  layers = {}
  for layer_name in _read_name_list(root, "layer_names"):
    if layer_name not in root:
      raise WeightFileError(
          f"{path}: layer {layer_name!r} is listed in 'layer_names' but has no "
          "group; the file is truncated or corrupted. Delete it and download it again.")
    group = root[layer_name]
    weights = []
    for weight_name in _read_name_list(group, "weight_names"):
      if weight_name not in group:
        raise WeightFileError(
            f"{path}: weight {weight_name!r} of layer {layer_name!r} is missing; "
            "the file is truncated or corrupted. Delete it and download it again.")
      weights.append((weight_name, np.asarray(group[weight_name])))
    layers[layer_name] = weights
  return layers


def _read_keras3(root: h5py.Group, path: str):
  layers = {}
  for group_name in root["layers"]:
    vars_group = root["layers"][group_name].get("vars")
    if vars_group is None:
      continue
    layer_name = _decode(vars_group.attrs.get("name", group_name))
    keys = sorted(vars_group.keys(), key=int)
    if keys != [str(i) for i in range(len(keys))]:
      raise WeightFileError(f"{path}: layer {layer_name!r} has variables {keys}, "
                            "expected 0..n-1; the file is corrupted.")
    layers[layer_name] = [(k, np.asarray(vars_group[k])) for k in keys]
  return layers


def read(path: str) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Reads every layer's weights from a legacy `.h5` or Keras 3 `.weights.h5` file.

  Raises WeightFileError naming the file when it is missing, not HDF5,
  truncated, or of neither layout.
  """
  if not os.path.isfile(path):
    raise WeightFileError(f"Weight file {path} does not exist.")
  try:
    with h5py.File(path, "r") as f:
      if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return _read_legacy(f, path)
      if "model_weights" in f:
        return _read_legacy(f["model_weights"], path)
      if "layers" in f:
        return _read_keras3(f, path)
      raise WeightFileError(
          f"{path} is HDF5 but neither a legacy Keras weight file (root attribute "
          "'layer_names') nor a Keras 3 .weights.h5 file (group 'layers').")
  except WeightFileError:
    raise
  except (OSError, KeyError, ValueError) as e:
    raise WeightFileError(
        f"Cannot read Keras weight file {path} ({type(e).__name__}: {e}). It is "
        "probably truncated or not an HDF5 file; delete it and download it again.") from e


def write_legacy(path: str, layers: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> None:
  """Writes layers in the legacy Keras HDF5 layout (as `keras.applications` files are).

  `layers` is [(layer_name, [(weight_name, array), ...]), ...] in model order;
  layers without weights may be included (they get an empty weight_names).
  Written to a temporary file in the same directory, then renamed, so a
  crash never leaves a half-written file behind.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=directory)
  os.close(fd)
  try:
    with h5py.File(tmp, "w") as f:
      _write_name_list(f, "layer_names", [name for name, _ in layers])
      f.attrs["backend"] = b"jax"
      f.attrs["keras_version"] = b"3"
      # Keras writes groups in sorted order so no name is a prefix problem.
      for layer_name, weights in sorted(layers, key=lambda item: item[0]):
        group = f.create_group(layer_name)
        _write_name_list(group, "weight_names", [w for w, _ in weights])
        for weight_name, value in weights:
          value = np.asarray(value)
          group.create_dataset(weight_name, data=value)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
