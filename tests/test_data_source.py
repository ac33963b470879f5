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
