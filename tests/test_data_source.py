"""affectjax.data: record codec round trip and `source()` over real shards."""
import json
import os
import pickle

import numpy as np
import pytest

from affectjax import data as affect_data
from data_prep import affectnet
from data_prep import synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp("raw"))
  out = str(tmp_path_factory.mktemp("prepared"))
  synthetic.generate(raw, num_train=48, num_val=16, seed=1, image_size=80)
  manifest = affectnet.prepare(raw, out, image_size=32, num_shards=3,
                               progress=False)
  return raw, out, manifest


def test_codec_round_trip_raw():
  img = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
  lm = np.arange(136, dtype=np.float32).reshape(68, 2)
  rec = affect_data.encode_record(image=img.tobytes(), expression=5,
                                  valence=-0.25, arousal=0.5, landmarks=lm,
                                  path="12/ab.jpg")
  ex = affect_data.decode_record(rec, encoding="raw", image_size=5)
  np.testing.assert_array_equal(ex["image"], img)
  np.testing.assert_array_equal(ex["landmarks"], lm)
  assert ex["expression"] == 5 and ex["expression"].dtype == np.int32
  assert ex["valence"] == np.float32(-0.25) and ex["arousal"] == 0.5
  assert ex["valence"].dtype == np.float32 and ex["path"] == "12/ab.jpg"
  no_lm = affect_data.decode_record(
      affect_data.encode_record(image=img.tobytes(), expression=0,
                                valence=-2.0, arousal=-2.0, landmarks=None,
                                path="x"), encoding="raw", image_size=5)
  assert np.isnan(no_lm["landmarks"]).all()
  with pytest.raises(ValueError, match="image_size"):
    affect_data.decode_record(rec, encoding="raw")


def test_source_matches_csv(prepared):
  raw, out, manifest = prepared
  with open(os.path.join(raw, "training.csv")) as fp:
    rows = {r.split(",")[0]: r.strip().split(",") for r in fp.readlines()[1:]}
  src = affect_data.source(out, "train")
  assert len(src) == manifest["splits"]["train"]["written"] == 48
  seen = set()
  for i in range(len(src)):
    ex = src[i]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["landmarks"].shape == (68, 2)
    row = rows[ex["path"]]
    assert ex["expression"] == int(row[6])
    assert ex["valence"] == pytest.approx(float(row[7]), abs=1e-6)
    assert ex["arousal"] == pytest.approx(float(row[8]), abs=1e-6)
    seen.add(ex["path"])
  assert seen == set(rows)  # Every row exactly once.
  # Class histogram in the manifest matches the records.
  hist = np.bincount([src[i]["expression"] for i in range(len(src))],
                     minlength=8)
  assert hist.tolist() == manifest["splits"]["train"]["class_counts"]
  assert len(affect_data.source(out, "val")) == 16


def test_source_is_picklable_and_bounds_checked(prepared):
  _, out, _ = prepared
  src = affect_data.source(out, "val")
  first = src[0]
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[0]["image"], first["image"])
  assert clone[-1]["path"] == src[len(src) - 1]["path"]
  with pytest.raises(IndexError):
    src[len(src)]


def test_source_errors_are_actionable(prepared, tmp_path):
  _, out, _ = prepared
  with pytest.raises(ValueError, match="split"):
    affect_data.source(out, "test")
  with pytest.raises(FileNotFoundError, match="data_prep"):
    affect_data.source(str(tmp_path), "train")
  # A manifest that lists a shard which is gone says how to fix it.
  broken = tmp_path / "broken"
  broken.mkdir()
  with open(os.path.join(out, "manifest.json")) as fp:
    m = json.load(fp)
  (broken / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(FileNotFoundError, match="Rerun"):
    affect_data.source(str(broken), "train")


def test_records_are_byte_identical_to_tfds_protobuf():
  """Our descriptor-built tf.train.Example writes what tfds' own class writes
  (deterministic map order), and each reads the other's records."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for t in range(20):
    lm = None if t % 3 == 0 else rng.normal(size=(68, 2)) * 100
    kw = dict(image=rng.integers(0, 256, int(rng.integers(0, 500)),
                                 dtype=np.uint8).tobytes(),
              expression=int(rng.integers(0, 8)), valence=float(rng.normal()),
              arousal=-2.0, landmarks=lm, path=f"{t}/é.jpg")
    ref = tf_example_pb2.Example()
    f = ref.features.feature
    f["image"].bytes_list.value.append(kw["image"])
    f["expression"].int64_list.value.append(kw["expression"])
    f["valence"].float_list.value.append(kw["valence"])
    f["arousal"].float_list.value.append(kw["arousal"])
    f["landmarks"].float_list.value.extend(
        (np.full(136, np.nan) if lm is None else lm.ravel()).astype(
            np.float32).tolist())
    f["path"].bytes_list.value.append(kw["path"].encode())
    ref_bytes = ref.SerializeToString(deterministic=True)
    assert affect_data.encode_record(**kw) == ref_bytes
    ex = affect_data.decode_record(ref_bytes, decode_image=False)
    assert ex["image"] == kw["image"] and ex["path"] == kw["path"]
    assert ex["expression"] == kw["expression"]
    assert ex["valence"] == np.float32(kw["valence"])
    image, expression, valence, arousal = affect_data.parse_training_fields(
        ref_bytes)
    assert (bytes(image), expression, arousal) == (kw["image"],
                                                  kw["expression"], -2.0)
  with pytest.raises(affect_data.RecordError):
    affect_data.parse_training_fields(b"\xff\xff not a record")


def test_batch_reads_labels_and_any_manifest_split(prepared, tmp_path):
  _, out, _ = prepared
  src = affect_data.source(out, "train")
  idx = [5, 47, 0, 5, 20]  # Across shards, out of order, repeated.
  records = src.read_records(idx)
  for i, rec in zip(idx, records):
    assert affect_data.decode_record(rec)["path"] == src[i]["path"]
  np.testing.assert_array_equal(
      src.labels(), [src[i]["expression"] for i in range(len(src))])
  with pytest.raises(IndexError, match="48 examples"):
    src.read_records([48])
  # A split data_prep adds (e.g. 'holdout') is readable once in the manifest.
  with open(os.path.join(out, "manifest.json")) as fp:
    m = json.load(fp)
  m["splits"]["holdout"] = m["splits"]["val"]
  for name in os.listdir(out):
    if name != "manifest.json" and not os.path.isdir(os.path.join(out, name)):
      os.symlink(os.path.join(out, name), tmp_path / name)
  (tmp_path / "manifest.json").write_text(json.dumps(m))
  assert len(affect_data.source(str(tmp_path), "holdout")) == 16
  with pytest.raises(ValueError, match="'holdout', 'train', 'val'"):
    affect_data.source(str(tmp_path), "test")
