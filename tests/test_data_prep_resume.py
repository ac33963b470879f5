"""A killed data_prep run, rerun with the same flags, equals an uninterrupted
one record for record; worker count never changes the output; the holdout
split is stratified, disjoint from train and stable."""
import collections
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from affectjax import data as affect_data
from data_prep import affectnet
from data_prep import shards
from data_prep import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--image_size=24", "--num_shards=4", "--no_progress"]
# Runs the real CLI (`python -m data_prep.affectnet ARGS`) with the ArrayRecord
# writer wrapped to SIGKILL the process after argv[1] records: a crash at a
# known point, mid-shard, with no test switch in the library.
_KILL_AFTER = r"""
import os, runpy, signal, sys
from array_record.python import array_record_module
limit, written = int(sys.argv[1]), [0]
real = array_record_module.ArrayRecordWriter

class KillingWriter:
  def __init__(self, *args):
    self._w = real(*args)
  def write(self, record):
    self._w.write(record)
    written[0] += 1
    if written[0] >= limit:
      os.kill(os.getpid(), signal.SIGKILL)
  def close(self):
    self._w.close()

array_record_module.ArrayRecordWriter = KillingWriter
sys.argv = ["data_prep.affectnet"] + sys.argv[2:]
runpy.run_module("data_prep.affectnet", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  synthetic.generate(root, num_train=40, num_val=8, seed=5, image_size=64)
  return root


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("reference"))
  affectnet.prepare(raw, out, image_size=24, num_shards=4, progress=False)
  return out


def _cli(raw, out, *extra, kill_after=None):
  run = [sys.executable, "-m", "data_prep.affectnet"]
  if kill_after is not None:
    run = [sys.executable, "-c", _KILL_AFTER, str(kill_after)]
  return subprocess.run(
      run + [f"--input_dir={raw}", f"--output_dir={out}", "--num_workers=1",
             *FLAGS, *extra],
      cwd=REPO, capture_output=True, text=True, timeout=120)


def _records(out):
  with open(os.path.join(out, affect_data.MANIFEST_NAME)) as fp:
    manifest = json.load(fp)
  recs = {}
  from array_record.python import array_record_data_source
  for split, info in manifest["splits"].items():
    paths = [os.path.join(out, s["file"]) for s in info["shards"]]
    src = array_record_data_source.ArrayRecordDataSource(paths)
    recs[split] = [src[i] for i in range(len(src))]
  return manifest, recs


def _files(out):
  return sorted(n for n in os.listdir(out) if not n.startswith("."))


def test_killed_run_resumes_to_identical_output(raw, reference, tmp_path):
  out = str(tmp_path / "out")
  # Shards hold 10 rows each: SIGKILL after 15 records is mid-shard 1.
  killed = _cli(raw, out, kill_after=15)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  left = os.listdir(out)
  assert affect_data.MANIFEST_NAME not in left
  assert [n for n in left if shards.TMP_TAG in n], left  # Half-written shard.
  done = sorted(os.listdir(os.path.join(out, shards.STATE_DIR)))
  assert done == ["affectnet-train.array_record-00000-of-00004.json",
                  "options.json"]
  first = os.path.join(out, "affectnet-train.array_record-00000-of-00004")
  first_stat = os.stat(first)

  resumed = _cli(raw, out)
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming: 1 of 8 shards already done" in resumed.stderr
  assert os.stat(first).st_mtime_ns == first_stat.st_mtime_ns  # Not redone.
  assert not [n for n in os.listdir(out) if shards.TMP_TAG in n]

  m_ref, r_ref = _records(reference)
  m_res, r_res = _records(out)
  assert r_res == r_ref  # Record for record, in order.
  assert m_res == m_ref
  assert _files(out) == _files(reference)
  for name in _files(reference):
    with open(os.path.join(out, name), "rb") as a, open(
        os.path.join(reference, name), "rb") as b:
      assert a.read() == b.read(), name


def test_missing_shard_and_stale_temp_files_are_redone(reference, raw,
                                                       tmp_path):
  import shutil
  out = str(tmp_path / "copy")
  shutil.copytree(reference, out)
  victim = "affectnet-train.array_record-00002-of-00004"
  os.remove(os.path.join(out, victim))
  with open(os.path.join(out, victim + shards.TMP_TAG + "999"), "wb") as fp:
    fp.write(b"half a shard")
  # A shard whose marker exists but whose bytes were truncated is redone too.
  other = os.path.join(out, "affectnet-val.array_record-00001-of-00004")
  with open(other, "r+b") as fp:
    fp.truncate(10)
  affectnet.prepare(raw, out, image_size=24, num_shards=4, progress=False)
  assert _records(out) == _records(reference)
  assert not [n for n in os.listdir(out) if shards.TMP_TAG in n]


def test_worker_count_does_not_change_output(raw, reference, tmp_path):
  affectnet.prepare(raw, str(tmp_path), image_size=24, num_shards=4,
                    num_workers=2, progress=False)
  assert _records(str(tmp_path)) == _records(reference)


def test_different_flags_refuse_to_mix(raw, reference, tmp_path):
  import shutil
  out = str(tmp_path / "copy")
  shutil.copytree(reference, out)
  with pytest.raises(ValueError, match="image_size"):
    affectnet.prepare(raw, out, image_size=16, num_shards=4, progress=False)
  res = _cli(raw, out, "--jpeg_quality=50")
  assert res.returncode != 0 and "jpeg_quality" in res.stderr
  m = affectnet.prepare(raw, out, image_size=16, num_shards=2,
                        overwrite=True, progress=False)
  assert m["image_size"] == 16
  assert affect_data.source(out, "train")[0]["image"].shape == (16, 16, 3)
  assert not [n for n in os.listdir(out) if "-of-00004" in n]


def _codes_by_path(raw):
  with open(os.path.join(raw, "training.csv"), newline="") as fp:
    return {r["subDirectory_filePath"]: int(r["expression"])
            for r in csv.DictReader(fp)}


def _split_paths(out, manifest, split):
  from array_record.python import array_record_data_source
  paths = [os.path.join(out, s["file"])
           for s in manifest["splits"][split]["shards"]]
  src = array_record_data_source.ArrayRecordDataSource(paths)
  return [affect_data.decode_record(src[i], encoding="jpeg",
                                    image_size=24)["path"]
          for i in range(len(src))]


def test_holdout_is_stratified_disjoint_and_stable(raw, reference, tmp_path):
  kw = dict(image_size=24, num_shards=2, holdout_fraction=0.25,
            holdout_seed=1, progress=False)
  a = str(tmp_path / "a")
  m = affectnet.prepare(raw, a, num_workers=1, **kw)
  held, train = _split_paths(a, m, "holdout"), _split_paths(a, m, "train")
  # Disjoint, and together exactly the train split prepared without holdout.
  assert not set(held) & set(train)
  m_ref = json.load(open(os.path.join(reference, "manifest.json")))
  assert sorted(held + train) == sorted(_split_paths(reference, m_ref,
                                                     "train"))
  # Stratified: per class, round(0.25 * n) rows (at most n - 1).
  n = collections.Counter(_codes_by_path(raw).values())
  want = [min(int(np.floor(0.25 * n[c] + 0.5)), n[c] - 1) for c in range(8)]
  assert m["splits"]["holdout"]["class_counts"] == want
  assert sum(want) == len(held) > 0
  assert [a + b for a, b in zip(m["splits"]["train"]["class_counts"], want)
          ] == m_ref["splits"]["train"]["class_counts"]
  assert m["holdout"] == {"from": "train", "fraction": 0.25, "seed": 1,
                          "stratified_by": "expression"}
  assert m["splits"]["val"] == {**m_ref["splits"]["val"],
                                "num_shards": 2,
                                "shards": m["splits"]["val"]["shards"]}
  # Stable across reruns and worker counts: byte-identical shards.
  b = str(tmp_path / "b")
  m2 = affectnet.prepare(raw, b, num_workers=2, **kw)
  assert m2["splits"]["holdout"]["shards"] == m["splits"]["holdout"]["shards"]
  assert m2["splits"]["train"]["shards"] == m["splits"]["train"]["shards"]
  # Another seed draws other rows, with the same per-class counts.
  m3 = affectnet.prepare(raw, str(tmp_path / "c"), num_workers=1,
                         **{**kw, "holdout_seed": 2})
  assert m3["splits"]["holdout"]["class_counts"] == want
  assert set(_split_paths(str(tmp_path / "c"), m3, "holdout")) != set(held)
  # tensorflow-datasets sees the holdout split too.
  import tensorflow_datasets as tfds
  info = tfds.builder_from_directory(a).info
  assert info.splits["holdout"].num_examples == len(held)
  assert info.splits["train"].num_examples == len(train)
  with pytest.raises(ValueError, match="--holdout_fraction"):
    affectnet.prepare(raw, str(tmp_path / "d"), holdout_fraction=1.0,
                      progress=False)
