"""AffectNet records: label constants, the on-disk record codec, and `source()`.

`python -m data_prep.affectnet` writes one serialized `tf.train.Example` per
face into sharded ArrayRecord files. The Example layout is exactly what
tensorflow-datasets writes for the features declared in
`data_prep/tfds_metadata.py`, so the same directory loads with
`tfds.data_source(...)`/`tfds.builder_from_directory(...)` (no TensorFlow
needed). This module owns the codec and reads and writes the protobuf wire
format itself, without tensorflow_datasets or a protobuf class (see the
"wire format" section below for why), and decodes images with simplejpeg.

Feature keys of a record:
  image       bytes: JPEG (encoding='jpeg') or raw H*W*3 uint8 (encoding='raw')
  expression  int64: class id 0..num_classes-1
  valence     float: in [-1, 1], or -2.0 = "no value" (AffectNet's convention)
  arousal     float: same as valence
  landmarks   136 floats: 68 (x, y) points in crop pixels, NaN if unknown
  path        bytes (utf-8): the source row's subDirectory_filePath / file path
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import threading
from typing import Any, Sequence

import numpy as np
from etils import epath
from array_record.python import array_record_module

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


# --------------------------------------------------------------------------
# tf.train.Example without tensorflow_datasets.
#
# Records are the protobuf `tensorflow.Example` that tfds writes. The message
# classes are built here from a descriptor, in a private descriptor pool (so
# they never clash with tfds' or TensorFlow's copies when those are imported
# too). Going through tfds' `tf_example_pb2` instead imported
# tensorflow_datasets into the trainer, and its first import runs inside
# etils' lazy-import context, which swaps `builtins.__import__` for the whole
# interpreter: Orbax's save threads importing at that moment got a
# `LazyModule` stand-in and crashed. The classes are upb's C parser,
# several times faster per record than a hand-written Python reader of the
# wire format, even one that skips landmarks and path.
# --------------------------------------------------------------------------
def _build_example_class():
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # pylint: disable=g-import-not-at-top
  fdp = descriptor_pb2.FileDescriptorProto(
      name="affectjax/tf_example.proto", package="tensorflow", syntax="proto3")
  F = descriptor_pb2.FieldDescriptorProto  # pylint: disable=invalid-name
  rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL

  def message(name, fields, nested=()):
    m = fdp.message_type.add(name=name)
    for fname, number, label, ftype, type_name, oneof in fields:
      f = m.field.add(name=fname, number=number, label=label, type=ftype)
      if type_name:
        f.type_name = type_name
      if oneof is not None:
        f.oneof_index = oneof
    for n in nested:
      m.nested_type.append(n)
    return m

  message("BytesList", [("value", 1, rep, F.TYPE_BYTES, "", None)])
  # proto3 packs repeated scalars by default, as tensorflow's feature.proto.
  message("FloatList", [("value", 1, rep, F.TYPE_FLOAT, "", None)])
  message("Int64List", [("value", 1, rep, F.TYPE_INT64, "", None)])
  feature = message("Feature", [
      ("bytes_list", 1, opt, F.TYPE_MESSAGE, ".tensorflow.BytesList", 0),
      ("float_list", 2, opt, F.TYPE_MESSAGE, ".tensorflow.FloatList", 0),
      ("int64_list", 3, opt, F.TYPE_MESSAGE, ".tensorflow.Int64List", 0)])
  feature.oneof_decl.add(name="kind")
  entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
  entry.field.add(name="key", number=1, label=opt, type=F.TYPE_STRING)
  entry.field.add(name="value", number=2, label=opt, type=F.TYPE_MESSAGE,
                  type_name=".tensorflow.Feature")
  entry.options.map_entry = True
  message("Features", [("feature", 1, rep, F.TYPE_MESSAGE,
                        ".tensorflow.Features.FeatureEntry", None)], [entry])
  message("Example", [("features", 1, opt, F.TYPE_MESSAGE,
                       ".tensorflow.Features", None)])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName("tensorflow.Example"))


Example = _build_example_class()


class RecordError(ValueError):
  """A record that is not a well-formed AffectNet tf.train.Example."""


def _parse(serialized) -> Any:
  try:
    return Example.FromString(serialized).features.feature
  except Exception as e:  # protobuf's DecodeError
    raise RecordError(f"not a tf.train.Example ({e})") from e


def _one(values, key: str):
  if len(values) != 1:
    raise RecordError(f"feature {key!r} holds {len(values)} values, expected 1")
  return values[0]


def parse_training_fields(serialized) -> tuple[bytes, int, float, float]:
  """Record -> (image bytes, expression, valence, arousal).

  The hot path of training and evaluation; landmarks and path stay unread.
  """
  f = _parse(serialized)
  image = f["image"].bytes_list.value
  expression = f["expression"].int64_list.value
  valence = f["valence"].float_list.value
  arousal = f["arousal"].float_list.value
  if len(image) == len(expression) == len(valence) == len(arousal) == 1:
    return image[0], expression[0], valence[0], arousal[0]
  # A missing key reads as an empty list (protobuf map semantics).
  for key, values in (("image", image), ("expression", expression),
                      ("valence", valence), ("arousal", arousal)):
    _one(values, key)
  raise AssertionError("unreachable")


def encode_record(*, image: bytes, expression: int, valence: float,
                  arousal: float, landmarks: np.ndarray | None,
                  path: str) -> bytes:
  """Serializes one face as a tfds-compatible `tf.train.Example`."""
  if landmarks is None:
    lm = np.full((NUM_LANDMARKS * 2,), np.nan, np.float32)
  else:
    lm = np.asarray(landmarks, np.float32).reshape(NUM_LANDMARKS * 2)
  ex = Example()
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
  image, expression, valence, arousal = parse_training_fields(serialized)
  f = _parse(serialized)
  if decode_image:
    image = decode_image_bytes(image, encoding=encoding, image_size=image_size)
  landmarks = np.asarray(f["landmarks"].float_list.value, np.float32)
  if landmarks.size != NUM_LANDMARKS * 2:
    raise RecordError(f"feature 'landmarks' holds {landmarks.size} floats, "
                      f"expected {NUM_LANDMARKS * 2}")
  return {
      "image": image,
      "expression": np.int32(expression),
      "valence": np.float32(valence),
      "arousal": np.float32(arousal),
      "landmarks": landmarks.reshape(NUM_LANDMARKS, 2),
      "path": _one(f["path"].bytes_list.value, "path").decode("utf-8"),
  }


# libjpeg's accurate integer IDCT, everywhere affectjax decodes (training,
# evaluation, `source()[i]`): the same pixels as PIL and tfds' own decoder
# (tests/test_data_prep.py checks), and as tf.io.decode_jpeg with
# dct_method='INTEGER_ACCURATE'. The fast IDCT (tf's default) is a few
# percent faster and differs by up to 7 levels.
JPEG_FAST_DCT = False


def decode_image_bytes(data: bytes, *, encoding: str,
                       image_size: int | None) -> np.ndarray:
  """Stored image bytes -> uint8 (H, W, 3) RGB."""
  if encoding == "jpeg":
    import simplejpeg  # pylint: disable=g-import-not-at-top
    return simplejpeg.decode_jpeg(data, colorspace="RGB",
                                  fastdct=JPEG_FAST_DCT)
  if encoding == "raw":
    if image_size is None:
      raise ValueError("decode_record(encoding='raw') needs image_size.")
    return np.frombuffer(data, np.uint8).reshape(image_size, image_size, 3)
  raise ValueError(f"Unknown image encoding {encoding!r}; expected 'jpeg' or "
                   "'raw'.")


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Loads `data_dir/manifest.json` (any epath), with an actionable error if absent."""
  path = epath.Path(data_dir) / MANIFEST_NAME
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found. `data_dir` (--config.data.dir={data_dir}) must be "
        "the --output_dir of `./launch.sh prep` / `python -m "
        "data_prep.affectnet`; `./launch.sh demo` prepares a synthetic one in "
        "runs/demo/data/arrayrecord.")
  return json.loads(path.read_text())


@dataclasses.dataclass
class AffectNetSource:
  """Random-access view of one split: `len()`, `[i]` -> decoded example dict.

  `[i]` decodes everything (landmarks and path included) for tools; the
  training input path uses `read_records` (a batch of indices, one
  ArrayRecord read per shard) and `data.parse_training_fields` instead.
  Thread-safe: ArrayRecord readers are opened once, under a lock, and their
  reads release the GIL. Picklable: it carries only file names and decode
  options and reopens the readers lazily after unpickling.
  """
  paths: Sequence[str]
  encoding: str
  image_size: int
  split: str = ""
  # The data dir's manifest.json the source was built from (read once by
  # `source`, or passed down by the caller who read it).
  manifest: dict[str, Any] = dataclasses.field(default_factory=dict,
                                               repr=False, compare=False)

  def __post_init__(self):
    self.paths = [os.fspath(p) for p in self.paths]
    self._readers = None
    self._starts = None
    self._lock = threading.Lock()

  def _open(self):
    if self._readers is None:
      with self._lock:
        if self._readers is None:
          readers, counts = [], []
          for p in self.paths:
            # ArrayRecord's documented random-access setting: no readahead,
            # and reads in the calling thread (the input path already runs
            # one batch per thread; less CPU per record than handing each
            # read to ArrayRecord's own pool).
            r = array_record_module.ArrayRecordReader(
                p, options="readahead_buffer_size:0,max_parallelism:0",
                file_reader_buffer_size=32768)
            readers.append(r)
            counts.append(r.num_records())
          self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(
              np.int64)
          self._readers = readers
    return self._readers

  def __len__(self) -> int:
    self._open()
    return int(self._starts[-1])

  def read_records(self, indices) -> list[bytes]:
    """Serialized records at `indices` (any order, repeats allowed).

    One `ArrayRecordReader.read` call per shard touched, rather than one per
    record: the per-call overhead is most of the cost of a small record.
    """
    readers = self._open()
    idx = np.asarray(indices, np.int64).reshape(-1)
    n = int(self._starts[-1])
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      bad = idx[(idx < 0) | (idx >= n)][0]
      raise IndexError(f"index {bad} out of range for {self.split!r} split "
                       f"with {n} examples.")
    shard = np.searchsorted(self._starts, idx, side="right") - 1
    out = [b""] * idx.size
    for s in np.unique(shard):
      rows = np.nonzero(shard == s)[0]
      rows = rows[np.argsort(idx[rows], kind="stable")]  # Ascending offsets.
      records = readers[s].read((idx[rows] - self._starts[s]).tolist())
      for r, rec in zip(rows.tolist(), records):
        out[r] = rec
    return out

  def labels(self) -> np.ndarray:
    """int32 expression class of every example, in index order.

    A labels-only pass over the records (the images are skipped, not
    decoded); the result is kept in memory only, never written next to the
    data.
    """
    n = len(self)
    out = np.empty((n,), np.int32)
    chunk = 2048

    def read(start: int) -> None:
      recs = self.read_records(range(start, min(n, start + chunk)))
      for j, rec in enumerate(recs):
        out[start + j] = _one(_parse(rec)["expression"].int64_list.value,
                              "expression")

    # Reads release the GIL: one thread per usable core overlaps them.
    with concurrent.futures.ThreadPoolExecutor(
        max(1, len(os.sched_getaffinity(0)))) as pool:
      list(pool.map(read, range(0, n, chunk)))
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self.split!r} split "
                       f"with {n} examples.")
    rec = self.read_records([int(index) % n])[0]
    try:
      return decode_record(rec, encoding=self.encoding,
                           image_size=self.image_size)
    except RecordError as e:
      raise RecordError(f"{self.split!r} example {index} of {self.paths}: {e}. "
                        "Re-prepare the data with `python -m "
                        "data_prep.affectnet`.") from e

  def __getstate__(self):
    state = self.__dict__.copy()
    # Readers hold file handles and locks do not pickle; reopen lazily.
    state["_readers"] = None
    state["_starts"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"AffectNetSource(split={self.split!r}, shards={len(self.paths)}, "
            f"encoding={self.encoding!r}, image_size={self.image_size})")


def source(data_dir: str | os.PathLike, split: str,
           manifest: dict[str, Any] | None = None) -> AffectNetSource:
  """Random-access source over any split listed in the dir's manifest.json.

  ``manifest``: that file's content when the caller has already read it (a
  run reads it once and passes it down); None reads it.
  """
  if manifest is None:
    manifest = read_manifest(data_dir)
  splits = manifest.get("splits", {})
  info = splits.get(split)
  if info is None:
    raise ValueError(f"{epath.Path(data_dir) / MANIFEST_NAME} has "
                     f"no {split!r} split; its splits are {sorted(splits)}.")
  paths = [os.fspath(epath.Path(data_dir) / s["file"])
           for s in info["shards"]]
  missing = [p for p in paths if not epath.Path(p).exists()]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} shard(s) listed in the manifest are missing, e.g. "
        f"{missing[0]}. Rerun `python -m data_prep.affectnet` with the same "
        "flags to finish them.")
  return AffectNetSource(paths=paths, encoding=manifest["encoding"],
                         image_size=int(manifest["image_size"]), split=split,
                         manifest=manifest)
