"""Read (and write) Keras weight files: legacy HDF5 and Keras 3 `.weights.h5`.

Legacy layout (what `keras.applications` downloads, e.g.
`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`, `efficientnetb3_notop.h5`):

  /                        attrs: layer_names = [b"input_1", b"block1_conv1", ...]
  /<layer_name>            attrs: weight_names = [...] (empty for layers without weights)
  /<layer_name>/<weight_name>   dataset (weight_name may contain '/', so it
                                is a path of nested groups)

The weight names changed with each Keras generation, and Keras never reads
them (it loads by order, see keras_plan):

  Keras 1 (the VGG16 file):      block1_conv1_W_1:0, block1_conv1_b_1:0
  TF-Keras 2 (EfficientNet):     block1a_dwconv/depthwise_kernel:0, stem_bn/gamma:0
  Keras 3 (legacy .h5 writer):   block1_conv1/kernel, plus a top_level_model_weights group

A full-model save puts the same structure under /model_weights. An attribute
list too big for one HDF5 object header (64 KiB) is split by Keras into
`layer_names0`, `layer_names1`, ...; both readers and the writer handle that.
Within a layer, weights come in Keras' legacy order: trainable weights, then
non-trainable ones (BatchNorm: gamma, beta, moving_mean, moving_variance).

Keras 3 layout (`model.save_weights("x.weights.h5")`): one group per layer
(with or without weights), named after the layer's class and its rank among
the model's layers of that class, which is what Keras matches on:

  /layers/<snake_class_name[_k]>/vars   attrs: name = layer name; datasets 0, 1, ...

`read` returns both as a `KerasWeights`: the file's layers in order, each
with its weights as (name, array) pairs (Keras 3 weights are unnamed: their
names are "0", "1", ...).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import h5py
import numpy as np

# HDF5 object headers hold at most 64 KiB of attributes (Keras' constant).
_HDF5_ATTR_LIMIT = 64512

LEGACY = "legacy"
KERAS3 = "keras3"


class WeightFileError(ValueError):
  """A weight file that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class FileLayer:
  """One layer of a weight file.

  name: the layer name (legacy: from `layer_names`; Keras 3: the group's
    `name` attribute, or its key when absent). Used in messages only.
  key: where the layer lives: the legacy group name (= name), or the Keras 3
    group key under /layers ('conv2d_3'), which Keras 3 matches on.
  weights: (weight name, array) in file order.
  """
  name: str
  key: str
  weights: list[tuple[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class KerasWeights:
  """The contents of a Keras weight file, as Keras' loaders see it.

  layout: LEGACY or KERAS3.
  layers: every layer in file order (legacy: `layer_names` order, which is
    what Keras loads by; Keras 3: group order, irrelevant since Keras 3
    matches on `key`), layers without weights included.
  top_level_weights: legacy only, the number of weights in the
    `top_level_model_weights` group (absent before Keras 3: 0). Keras loads
    them into the model's own variables, which a keras.applications model
    has none of.
  """
  path: str
  layout: str
  keras_version: str
  layers: list[FileLayer]
  top_level_weights: int = 0

  def weighted_layers(self) -> list[FileLayer]:
    """Layers that carry weights, in file order: what Keras' legacy loader counts."""
    return [layer for layer in self.layers if layer.weights]


def _decode(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _read_name_list(group: h5py.Group, name: str) -> list[str]:
  """Reads a (possibly chunked: name0, name1, ...) string-list attribute; absent -> []."""
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


def _read_weights(group: h5py.Group, layer_name: str, path: str):
  weights = []
  for weight_name in _read_name_list(group, "weight_names"):
    if weight_name not in group:
      raise WeightFileError(
          f"{path}: weight {weight_name!r} of layer {layer_name!r} is listed in "
          "'weight_names' but missing; the file is truncated or corrupted. "
          "Delete it and download it again.")
    weights.append((weight_name, np.asarray(group[weight_name])))
  return weights


def _read_legacy(root: h5py.Group, path: str) -> KerasWeights:
  layers = []
  for layer_name in _read_name_list(root, "layer_names"):
    if layer_name not in root:
      raise WeightFileError(
          f"{path}: layer {layer_name!r} is listed in 'layer_names' but has no "
          "group; the file is truncated or corrupted. Delete it and download it again.")
    layers.append(FileLayer(layer_name, layer_name,
                            _read_weights(root[layer_name], layer_name, path)))
  top = root.get("top_level_model_weights")
  top_count = len(_read_name_list(top, "weight_names")) if top is not None else 0
  # Keras treats a file without the attribute as written by Keras 1.
  version = _decode(root.attrs.get("keras_version", b"1"))
  return KerasWeights(path, LEGACY, version, layers, top_count)


def _read_keras3(root: h5py.Group, path: str) -> KerasWeights:
  layers = []
  for key in root["layers"]:
    vars_group = root["layers"][key].get("vars")
    if vars_group is None:
      layers.append(FileLayer(key, key, []))
      continue
    layer_name = _decode(vars_group.attrs.get("name", key))
    names = sorted(vars_group.keys(), key=lambda k: int(k) if k.isdigit() else -1)
    if names != [str(i) for i in range(len(names))]:
      raise WeightFileError(f"{path}: layer {layer_name!r} ({key}) has variables "
                            f"{names}, expected 0..n-1; the file is corrupted.")
    layers.append(FileLayer(layer_name, key, [(k, np.asarray(vars_group[k])) for k in names]))
  return KerasWeights(path, KERAS3, "3", layers)


def read(path: str) -> KerasWeights:
  """Reads every layer's weights from a legacy `.h5` or Keras 3 `.weights.h5` file.

  Which layout is decided as Keras' `load_weights` does for a legacy file
  (root attribute `layer_names`, else a `model_weights` group); a `layers`
  group means Keras 3. Raises WeightFileError naming the file when it is
  missing, not HDF5, truncated, or of neither layout.
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


def write_legacy(path: str, layers: list[tuple[str, list[tuple[str, np.ndarray]]]], *,
                 keras_version: str = "2.4.0", backend: str = "tensorflow") -> None:
  """Writes layers in the legacy Keras HDF5 layout of the TF-Keras 2 era files.

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
      f.attrs["backend"] = backend.encode("utf8")
      f.attrs["keras_version"] = keras_version.encode("utf8")
      # Keras writes groups in sorted order so no name is a prefix problem.
      for layer_name, weights in sorted(layers, key=lambda item: item[0]):
        group = f.create_group(layer_name)
        _write_name_list(group, "weight_names", [w for w, _ in weights])
        for weight_name, value in weights:
          group.create_dataset(weight_name, data=np.asarray(value))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
