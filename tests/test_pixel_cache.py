"""The decoded-image cache over real prepared ArrayRecords: built once, rebuilt
when the data changes, never read half-built, bit-identical batches with and
without it (one process and two), and training with it equal to training
without it. (tests/test_end_to_end.py's 2 processes == 1 process runs use the
default cache=auto, so they train from the cache too.)"""
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from affectjax import data, input_pipeline, pixel_cache
from configs import custom_cnn
from tests import use_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, cache, **overrides):
  c = custom_cnn.get_config("tiny")
  c.data.dir = str(data_dir)
  c.data.cache = str(cache)
  return use_fixtures.override(c, **overrides)


def _take(ds, n):
  it = iter(ds)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _entries(cache_dir):
  return sorted(os.path.relpath(p, cache_dir) for p in
                glob.glob(os.path.join(str(cache_dir), "*", "*"))
                if not os.path.basename(p).startswith("."))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Its own copy of the synthetic data: tests here re-prepare it."""
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("cache_data")
  synthetic.generate(str(root / "raw"), num_train=160, num_val=52, seed=0)
  affectnet.prepare(str(root / "raw"), str(root / "prepared"), image_size=24,
                    num_workers=1, progress=False)
  return root


def test_batches_are_bit_identical_with_and_without_the_cache(prepared,
                                                              tmp_path):
  data_dir = prepared / "prepared"
  loaders = {}
  for image_size in (16, 12):  # 12: the JPEGs decode at 1/2 DCT scale.
    batches = {}
    for cache in ("none", "index", tmp_path / "cache"):
      with pytest.MonkeyPatch.context() as mp:
        if cache == "index":  # The JPEG path over the record index alone.
          real_plan = pixel_cache.plan
          mp.setattr(pixel_cache, "plan", lambda *a: dataclasses.replace(
              real_plan(*a), pixels=False))
          cache = tmp_path / "index"
        c = _config(data_dir, cache, image_size=image_size)
        train = _take(input_pipeline.train_dataset(c, local_batch_size=16), 12)
        ev, _ = input_pipeline.eval_dataset(c, local_batch_size=24)
        batches[cache] = train + list(input_pipeline.iterate(ev))
        rows, _ = input_pipeline._loader(c, data.source(data_dir, "train"))  # pylint: disable=protected-access
        loaders[os.path.basename(str(cache))] = type(rows).__name__
    reference = batches.pop("none")
    for name, got in batches.items():
      assert len(got) == len(reference)
      for a, b in zip(reference, got):
        assert a.keys() == b.keys()
        for k in a:
          assert a[k].dtype == b[k].dtype, (name, k)
          np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
  assert loaders == {"none": "_RecordRows", "index": "_IndexedRows",
                     "cache": "_CachedRows"}
  # The index placed every image in its shard file; some span a block
  # header of the file (reassembled), most do not (decoded in place).
  [path] = glob.glob(str(tmp_path / "index" / "*" / "train.index.npz"))
  with np.load(path) as z:
    index = pixel_cache.RecordIndex(**{k: z[k] for k in z.files})
  assert (index.offset >= 0).all()
  whole = pixel_cache.contiguous(index.offset, index.length)
  assert 0 < (~whole).sum() < len(whole) // 2
  # Records it could not place are read as records, with the same pixels.
  src = data.source(data_dir, "train")
  c = _config(data_dir, "none")
  decoder = input_pipeline._decoder(c, src)  # pylint: disable=protected-access
  index.offset[::3] = -1
  rows = input_pipeline._IndexedRows(src, decoder, index)  # pylint: disable=protected-access
  idx = np.arange(40)[::-1]
  got = rows.load(idx, 48)
  want = input_pipeline._RecordRows(src, decoder).load(idx, 48)  # pylint: disable=protected-access
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_built_once_reused_and_rebuilt_when_the_data_changes(prepared,
                                                             tmp_path):
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / "prepared"
  shutil.copytree(prepared / "prepared", data_dir)
  cache = tmp_path / "cache"
  c = _config(data_dir, cache)
  first = _take(input_pipeline.train_dataset(c, local_batch_size=16), 1)[0]
  built = _entries(cache)
  assert [os.path.basename(p) for p in built] == [
      "meta.json", "train-24px.npy", "train.index.npz"]
  pixels = os.path.join(cache, [p for p in built if p.endswith(".npy")][0])
  stamp = os.stat(pixels).st_mtime_ns, os.stat(pixels).st_ino
  input_pipeline._LOADERS.clear()  # pylint: disable=protected-access  # As a new process.
  again = _take(input_pipeline.train_dataset(c, local_batch_size=16), 1)[0]
  assert (os.stat(pixels).st_mtime_ns, os.stat(pixels).st_ino) == stamp
  np.testing.assert_array_equal(first["image"], again["image"])

  uncached = _config(data_dir, "none")
  _take(input_pipeline.train_dataset(uncached, local_batch_size=16), 1)

  # Prepare other faces into the same dir: a new key, a new cache, the old
  # one removed; the uncached path reads the new files too.
  synthetic.generate(str(tmp_path / "raw2"), num_train=160, num_val=52, seed=5)
  shutil.rmtree(data_dir)
  affectnet.prepare(str(tmp_path / "raw2"), str(data_dir), image_size=24,
                    num_workers=1, progress=False)
  changed = _take(input_pipeline.train_dataset(c, local_batch_size=16), 1)[0]
  rebuilt = _entries(cache)
  assert len(rebuilt) == 3 and rebuilt[0].split("/")[0] != built[0].split("/")[0]
  assert not os.path.exists(pixels)
  src = data.source(data_dir, "train")
  order = input_pipeline.ShuffleOrder(len(src), c.seed)
  fresh = _take(input_pipeline.train_dataset(uncached, local_batch_size=16),
                1)[0]
  for row, i in enumerate(order.indices(0, 16)):
    np.testing.assert_array_equal(changed["image"][row], src[int(i)]["image"])
    np.testing.assert_array_equal(fresh["image"][row], src[int(i)]["image"])
  assert not np.array_equal(changed["image"], first["image"])


_SLOW_BUILD = r"""
import sys, time
import simplejpeg
from affectjax import input_pipeline
from configs import custom_cnn
real = simplejpeg.decode_jpeg
def slow(*a, **k):
  time.sleep(0.02)
  return real(*a, **k)
simplejpeg.decode_jpeg = slow  # A build that takes seconds, to be killed.
input_pipeline.simplejpeg.decode_jpeg = slow
c = custom_cnn.get_config("tiny")
c.data.dir, c.data.cache, c.data.num_workers = sys.argv[1], sys.argv[2], 1
input_pipeline.train_dataset(c, local_batch_size=8)
print("finished", flush=True)
"""


def test_a_killed_build_is_never_read(prepared, tmp_path):
  data_dir, cache = prepared / "prepared", tmp_path / "cache"
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(data_dir),
                           str(cache)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  try:
    deadline = time.monotonic() + 60
    while not glob.glob(str(cache / "*" / ".train-24px.npy.tmp-*")):
      assert not glob.glob(str(cache / "*" / "train-24px.npy")), (
          "written under the name that is read")
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      assert time.monotonic() < deadline, "the build never started"
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # Mid-build: pixels half written.
    assert proc.wait(timeout=10) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert "finished" not in proc.stdout.read()
  [tmp] = glob.glob(str(cache / "*" / ".train-24px.npy.tmp-*"))
  final = os.path.join(os.path.dirname(tmp), "train-24px.npy")
  assert not os.path.exists(final)  # Nothing under the name that is read.

  c = _config(data_dir, cache)
  got = _take(input_pipeline.train_dataset(c, local_batch_size=16), 10)
  assert os.path.exists(final) and not os.path.exists(tmp)  # Rebuilt, cleared.
  want = _take(input_pipeline.train_dataset(
      _config(data_dir, "none"), local_batch_size=16), 10)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_auto_follows_free_space_and_says_why(prepared, tmp_path, monkeypatch,
                                              caplog):
  data_dir = prepared / "prepared"
  monkeypatch.setattr(pixel_cache, "DEFAULT_LOCATION", str(tmp_path / "auto"))
  src = data.source(data_dir, "train")
  size = 24  # The host size of the tiny config over 24 px JPEGs.
  need = len(src) * size * size * 3
  free = {"bytes": 100 << 30}
  monkeypatch.setattr(pixel_cache, "_free_bytes",
                      lambda path: (free["bytes"], 200 << 30))
  c = _config(data_dir, "auto")
  on = pixel_cache.plan(c, src, size)
  assert on.pixels and on.directory.startswith(str(tmp_path / "auto"))
  assert "fits" in pixel_cache.describe(on, 0.0)
  free["bytes"] = need + (20 << 30) - 1  # Short of the 10% margin.
  off = pixel_cache.plan(c, src, size)
  assert off.directory == on.directory and not off.pixels
  line = pixel_cache.describe(off, 0.0)
  assert line.startswith("Pixel cache for 'train' off (") and (
      "does not fit" in line and "record index" in line), line
  # The JPEG path over the index still delivers the stored pixels.
  with caplog.at_level("INFO"):
    batch = _take(input_pipeline.train_dataset(c, local_batch_size=16), 1)[0]
  assert any("does not fit" in r.getMessage() for r in caplog.records)
  assert not glob.glob(str(tmp_path / "auto" / "*" / "*.npy"))
  first = input_pipeline.ShuffleOrder(len(src), c.seed).indices(0, 1)[0]
  np.testing.assert_array_equal(batch["image"][0], src[int(first)]["image"])

  assert pixel_cache.plan(_config(data_dir, "none"), src,
                          size).directory is None
  free["bytes"] = need - 1  # A directory given explicitly: an error.
  with pytest.raises(ValueError, match="config.data.cache=.*needs"):
    pixel_cache.plan(_config(data_dir, tmp_path / "forced"), src, size)
  # A location that cannot be written: off under auto, an error if named.
  (tmp_path / "a_file").write_text("")
  monkeypatch.setattr(pixel_cache, "DEFAULT_LOCATION",
                      str(tmp_path / "a_file" / "pixels"))
  unwritable = pixel_cache.plan(c, src, size)
  assert unwritable.directory is None and "not writable" in unwritable.reason
  with pytest.raises(ValueError, match="cannot create or write"):
    pixel_cache.plan(_config(data_dir, tmp_path / "a_file" / "x"), src, size)
  # Once built, a cache is reused whatever the free space says.
  free["bytes"] = 100 << 30
  _take(input_pipeline.train_dataset(_config(data_dir, tmp_path / "f2"),
                                     local_batch_size=16), 1)
  free["bytes"] = 0
  reused = pixel_cache.plan(_config(data_dir, tmp_path / "f2"), src, size)
  assert reused.pixels and "reused" in pixel_cache.describe(reused, 0.0)


# --------------------------------------------------------------------------
# Training: the same parameters with and without the cache; 2 processes with
# the cache equal 1 process without it.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uncached_run(prepared, tmp_path_factory):
  from affectjax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("uncached"))
  train.train_and_evaluate(_config(prepared / "prepared", "none"), workdir)
  return workdir


def _val_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"val"' in l]


@pytest.mark.slow
def test_training_with_the_cache_equals_training_without(prepared,
                                                         uncached_run,
                                                         tmp_path):
  from affectjax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "cached")
  train.train_and_evaluate(_config(prepared / "prepared", tmp_path / "cache"),
                           workdir)
  assert glob.glob(str(tmp_path / "cache" / "*" / "val-24px.npy"))  # Eval too.
  step, params = use_fixtures.final_params(workdir)
  ref_step, ref = use_fixtures.final_params(uncached_run)
  assert step == ref_step
  for x, y in zip(params, ref, strict=True):
    np.testing.assert_array_equal(x, y)  # Exactly.
  for a, b in zip(_val_lines(workdir), _val_lines(uncached_run), strict=True):
    assert (a["loss"], a["macro_f1"]) == (b["loss"], b["macro_f1"])


_READER = r"""
import sys
import numpy as np
from absl import logging
from affectjax import input_pipeline
from configs import custom_cnn
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
data_dir, cache, p, out = sys.argv[1:]
c = custom_cnn.get_config("tiny")
c.data.dir, c.data.cache, c.data.sampler = data_dir, cache, "balanced"
it = iter(input_pipeline.train_dataset(c, local_batch_size=8,
                                       process_index=int(p), process_count=2))
batches = [next(it) for _ in range(25)]  # Past the end of the first epoch.
ev, _ = input_pipeline.eval_dataset(c, local_batch_size=12,
                                    process_index=int(p), process_count=2)
batches += list(input_pipeline.iterate(ev))
np.savez(out, **{f"{k}_{b}": x[k] for b, x in enumerate(batches) for k in x})
"""


def test_two_processes_building_one_cache_deliver_the_uncached_global_batches(
    prepared, tmp_path):
  """Two real processes start on one empty cache directory at once (one
  builds, the other waits on the lock): their slices of every global batch,
  side by side, are one uncached process's batches, bit for bit."""
  data_dir, cache = prepared / "prepared", tmp_path / "cache"
  procs = [subprocess.Popen(
      [sys.executable, "-c", _READER, str(data_dir), str(cache), str(p),
       str(tmp_path / f"p{p}.npz")], cwd=REPO, stderr=subprocess.PIPE,
      text=True, env={**os.environ, "PYTHONPATH": REPO}) for p in range(2)]
  try:
    errs = [p.communicate(timeout=120)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  assert sum("Pixel cache for 'train' on" in e for e in errs) == 2
  assert len(glob.glob(str(cache / "*" / "*.npy"))) == 2  # train and val.
  c = _config(data_dir, "none", **{"data.sampler": "balanced"})
  want = _take(input_pipeline.train_dataset(c, local_batch_size=16), 25)
  ev, _ = input_pipeline.eval_dataset(c, local_batch_size=24)
  want += list(input_pipeline.iterate(ev))
  got = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
  for b, batch in enumerate(want):
    for k, x in batch.items():
      np.testing.assert_array_equal(
          x, np.concatenate([g[f"{k}_{b}"] for g in got]), err_msg=f"{k} {b}")
