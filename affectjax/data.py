"""AffectNet records: label constants, the on-disk record codec, and `source()`.

`python -m data_prep.affectnet` writes one serialized `tf.train.Example` per
face into sharded ArrayRecord files. The Example layout is exactly what
tensorflow-datasets writes for the features declared in
`data_prep/tfds_metadata.py`, so the same directory loads with
`tfds.data_source(...)`/`tfds.builder_from_directory(...)` (no TensorFlow
needed: tfds ships its own protobuf classes). This module owns the codec and
decodes records itself, because tfds' generic parser + PIL decode is several
times slower than a direct protobuf read + simplejpeg in Grain workers.

Feature keys of a record:
  image       bytes: JPEG (encoding='jpeg') or raw H*W*3 uint8 (encoding='raw')
  expression  int64: class id 0..num_classes-1
  valence     float: in [-1, 1], or -2.0 = "no value" (AffectNet's convention)
  arousal     float: same as valence
  landmarks   136 floats: 68 (x, y) points in crop pixels, NaN if unknown
  path        bytes (utf-8): the source row's subDirectory_filePath / file path
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any, Sequence

import numpy as np

# AffectNet's expression codes. 8/9/10 (None, Uncertain, No-Face) exist in the
# official CSVs but are never written as training classes.
LABEL_NAMES_8 = ("neutral", "happy", "sad", "surprise", "fear", "disgust",
                 "anger", "contempt")
# The 7-class protocol drops Contempt (code 7); codes 0-6 keep their ids.
LABEL_NAMES_7 = LABEL_NAMES_8[:7]
NON_EXPRESSION_CODES = {8: "none", 9: "uncertain", 10: "no_face"}
NUM_LANDMARKS = 68
# AffectNet marks a missing valence/arousal with -2; the loss masks any value
# outside [-1, 1], so this is what every "no value" is written as.
NO_VALUE = -2.0

MANIFEST_NAME = "manifest.json"
DATASET_NAME = "affectnet"
SPLITS = ("train", "val")
FILE_FORMAT = "array_record"


def label_names(num_classes: int) -> tuple[str, ...]:
  """Expression names for the 8- or 7-class protocol (index = class id)."""
  if num_classes == 8:
    return LABEL_NAMES_8
  if num_classes == 7:
    return LABEL_NAMES_7
  raise ValueError(f"num_classes must be 7 or 8, got {num_classes}.")


def shard_filename(split: str, shard: int, num_shards: int) -> str:
  """tfds' default file name template: `{DATASET}-{SPLIT}.{FORMAT}-{X}-of-{Y}`."""
  return (f"{DATASET_NAME}-{split}.{FILE_FORMAT}-"
          f"{shard:05d}-of-{num_shards:05d}")


_PB2 = None
# Grain decodes in several threads per worker process. Concurrent first
# imports of tensorflow_datasets (which has import cycles) deadlock on
# Python's per-module import locks, so the first import is serialized here.
_INIT_LOCK = threading.RLock()


def _example_pb2():
  """tfds' own copy of tf.train.Example; importing it does not import TF."""
  global _PB2
  if _PB2 is None:
    with _INIT_LOCK:
      if _PB2 is None:
        from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
        _PB2 = tf_example_pb2
  return _PB2


def encode_record(*, image: bytes, expression: int, valence: float,
                  arousal: float, landmarks: np.ndarray | None,
                  path: str) -> bytes:
  """Serializes one face as a tfds-compatible `tf.train.Example`."""
  pb = _example_pb2()
  if landmarks is None:
    lm = np.full((NUM_LANDMARKS * 2,), np.nan, np.float32)
  else:
    lm = np.asarray(landmarks, np.float32).reshape(NUM_LANDMARKS * 2)
  ex = pb.Example()
  f = ex.features.feature
  f["image"].bytes_list.value.append(bytes(image))
  f["expression"].int64_list.value.append(int(expression))
  f["valence"].float_list.value.append(float(valence))
  f["arousal"].float_list.value.append(float(arousal))
  f["landmarks"].float_list.value.extend(lm.tolist())
  f["path"].bytes_list.value.append(path.encode("utf-8"))
  # deterministic=True sorts the map keys: byte-identical records across
  # processes (upb otherwise orders map entries by a per-process hash seed),
  # which resumable runs and shard checksums rely on.
  return ex.SerializeToString(deterministic=True)


def decode_record(serialized: bytes, *, encoding: str = "jpeg",
                  image_size: int | None = None,
                  decode_image: bool = True) -> dict[str, Any]:
  """Parses one record into the dict `source()` returns.

  Args:
    serialized: bytes written by `encode_record`.
    encoding: 'jpeg' or 'raw' (from the manifest).
    image_size: side of the square raw image; needed for encoding='raw'.
    decode_image: if False, `image` stays the stored bytes (for tools that
      only need labels, e.g. computing histograms).
  """
  ex = _example_pb2().Example.FromString(serialized)
  f = ex.features.feature
  image = f["image"].bytes_list.value[0]
  if decode_image:
    image = decode_image_bytes(image, encoding=encoding, image_size=image_size)
  return {
      "image": image,
      "expression": np.int32(f["expression"].int64_list.value[0]),
      "valence": np.float32(f["valence"].float_list.value[0]),
      "arousal": np.float32(f["arousal"].float_list.value[0]),
      "landmarks": np.asarray(f["landmarks"].float_list.value,
                              np.float32).reshape(NUM_LANDMARKS, 2),
      "path": f["path"].bytes_list.value[0].decode("utf-8"),
  }


def decode_image_bytes(data: bytes, *, encoding: str,
                       image_size: int | None) -> np.ndarray:
  """Stored image bytes -> uint8 (H, W, 3) RGB."""
  if encoding == "jpeg":
    import simplejpeg  # pylint: disable=g-import-not-at-top
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
  if encoding == "raw":
    if image_size is None:
      raise ValueError("decode_record(encoding='raw') needs image_size.")
    return np.frombuffer(data, np.uint8).reshape(image_size, image_size, 3)
  raise ValueError(f"Unknown image encoding {encoding!r}; expected 'jpeg' or "
                   "'raw'.")


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Loads `data_dir/manifest.json`, with an actionable error if absent."""
  path = os.path.join(os.fspath(data_dir), MANIFEST_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found. `data_dir` must be the --output_dir of "
        "`python -m data_prep.affectnet` (or run `python -m "
        "data_prep.synthetic` first to get a synthetic dataset).")
  with open(path) as fp:
    return json.load(fp)


@dataclasses.dataclass
class AffectNetSource:
  """Random-access view of one split: `len()`, `[i]` -> decoded example dict.

  Picklable: it carries only file names and decode options, and opens the
  ArrayRecord readers lazily in whichever process first indexes it (Grain
  worker processes receive a pickled copy).
  """
  paths: Sequence[str]
  encoding: str
  image_size: int
  split: str = ""

  def __post_init__(self):
    self.paths = [os.fspath(p) for p in self.paths]
    self._reader = None

  def _open(self):
    if self._reader is None:
      with _INIT_LOCK:
        if self._reader is None:
          from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
          self._reader = array_record_data_source.ArrayRecordDataSource(
              self.paths)
    return self._reader

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self.split!r} split "
                       f"with {n} examples.")
    return decode_record(self._open()[int(index) % n], encoding=self.encoding,
                         image_size=self.image_size)

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_reader"] = None  # Readers hold file handles; reopen after unpickle.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    # Unpickling runs in the worker's main thread, before Grain starts its
    # decode threads: do the one-time imports here, not in those threads.
    _example_pb2()

  def __repr__(self) -> str:
    return (f"AffectNetSource(split={self.split!r}, shards={len(self.paths)}, "
            f"encoding={self.encoding!r}, image_size={self.image_size})")


def source(data_dir: str | os.PathLike, split: str) -> AffectNetSource:
  """Random-access source over `split` ('train' | 'val') of a prepared dir."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  manifest = read_manifest(data_dir)
  info = manifest["splits"].get(split)
  if info is None:
    raise ValueError(f"{data_dir}/{MANIFEST_NAME} has no {split!r} split; it "
                     f"has {sorted(manifest['splits'])}.")
  paths = [os.path.join(os.fspath(data_dir), s["file"])
           for s in info["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} shard(s) listed in the manifest are missing, e.g. "
        f"{missing[0]}. Rerun `python -m data_prep.affectnet` with the same "
        "flags to finish them.")
  return AffectNetSource(paths=paths, encoding=manifest["encoding"],
                         image_size=int(manifest["image_size"]), split=split)
