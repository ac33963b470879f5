"""The decoded-image cache over real prepared ArrayRecords: built once, rebuilt
when the data changes, never read half-built, bit-identical batches with and
without it (one process and two), and training with it equal to training
without it; where `auto` puts it (never on a network home), one decision per
host, a file system that cannot lock, and each split opened once per process.
(tests/test_end_to_end.py's 2 processes == 1 process runs use the default
cache=auto, so they train from the cache too.)"""
import contextlib
import dataclasses
import errno
import gc
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref

import jax
import numpy as np
import pytest

from affectjax import batch_loaders, cache_location, data, input_pipeline
from affectjax import pixel_cache
from affectjax import record_index, sampling
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


@pytest.fixture(autouse=True)
def _as_a_new_process():
  """Each test starts as a fresh process would: no loaders, no decisions."""
  batch_loaders.forget()
  yield
  batch_loaders.forget()


@contextlib.contextmanager
def _log_lines():
  """The messages logged (INFO and up) while inside."""
  lines = []

  class Keep(logging.Handler):
    def emit(self, record):
      lines.append(record.getMessage())

  root, handler = logging.getLogger(), Keep(logging.INFO)
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    yield lines
  finally:
    root.removeHandler(handler)
    root.setLevel(level)


def _enolck(f, operation):
  del f, operation
  raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


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
        rows, _ = batch_loaders.loader(c, data.source(data_dir, "train"))  # pylint: disable=protected-access
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
    index = record_index.RecordIndex(**{k: z[k] for k in z.files})
  assert (index.offset >= 0).all()
  whole = record_index.contiguous(index.offset, index.length)
  assert 0 < (~whole).sum() < len(whole) // 2
  # Records it could not place are read as records, with the same pixels.
  src = data.source(data_dir, "train")
  c = _config(data_dir, "none")
  decoder = batch_loaders._decoder(c, src)  # pylint: disable=protected-access
  index.offset[::3] = -1
  rows = batch_loaders._IndexedRows(src, decoder, index)  # pylint: disable=protected-access
  idx = np.arange(40)[::-1]
  got = rows.load(idx, 48)
  want = batch_loaders._RecordRows(src, decoder).load(idx, 48)  # pylint: disable=protected-access
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
  batch_loaders.forget()  # As a new process.
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
  order = sampling.ShuffleOrder(len(src), c.seed)
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
  monkeypatch.setenv(pixel_cache.LOCATION_ENV, str(tmp_path / "auto"))
  src = data.source(data_dir, "train")
  size = 24  # The host size of the tiny config over 24 px JPEGs.
  need = len(src) * size * size * 3
  free = {"bytes": 100 << 30}
  monkeypatch.setattr(cache_location, "free_bytes",
                      lambda path: (free["bytes"], 200 << 30))
  c = _config(data_dir, "auto")
  on = pixel_cache.plan(c, src, size)
  assert on.pixels and on.directory.startswith(str(tmp_path / "auto"))
  assert "fits" in pixel_cache.describe(on, 0.0)
  # The decision is recorded with the cache.
  with open(os.path.join(on.directory, "meta.json")) as f:
    assert json.load(f)["pixels"][str(size)]["cache"] is True
  batch_loaders.forget()  # A later run: nobody holds that decision now.
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
  first = sampling.ShuffleOrder(len(src), c.seed).indices(0, 1)[0]
  np.testing.assert_array_equal(batch["image"][0], src[int(first)]["image"])

  assert pixel_cache.plan(_config(data_dir, "none"), src,
                          size).directory is None
  free["bytes"] = need - 1  # A directory given explicitly: an error.
  with pytest.raises(ValueError, match="config.data.cache=.*needs"):
    pixel_cache.plan(_config(data_dir, tmp_path / "forced"), src, size)
  # A location that cannot be written: off under auto, an error if named.
  (tmp_path / "a_file").write_text("")
  monkeypatch.setenv(pixel_cache.LOCATION_ENV, str(tmp_path / "a_file"))
  unwritable = pixel_cache.plan(c, src, size)
  assert unwritable.directory is None and "not writable" in unwritable.reason
  with pytest.raises(ValueError, match="cannot create or write"):
    pixel_cache.plan(_config(data_dir, tmp_path / "a_file" / "x"), src, size)
  # Once built, a cache is reused whatever the free space says.
  free["bytes"] = 100 << 30
  _take(input_pipeline.train_dataset(_config(data_dir, tmp_path / "f2"),
                                     local_batch_size=16), 1)
  batch_loaders.forget()
  free["bytes"] = 0
  reused = pixel_cache.plan(_config(data_dir, tmp_path / "f2"), src, size)
  assert reused.pixels and "reused" in pixel_cache.describe(reused, 0.0)


def test_a_network_home_is_passed_over_for_node_local_scratch(
    prepared, tmp_path, monkeypatch):
  """statfs(2) says what file system a location is on: `auto` skips a home
  on NFS (or Lustre, GPFS, ...) for $TMPDIR, then /tmp; AFFECTJAX_CACHE_DIR
  is used wherever it is."""
  real = cache_location.filesystem_type
  # The real call reads f_type: /proc is procfs (PROC_SUPER_MAGIC), and a
  # path not made yet is asked of its nearest existing parent.
  assert real("/proc") == 0x9FA0
  assert real(str(tmp_path / "not" / "yet")) == real(str(tmp_path))
  assert real(str(tmp_path)) not in cache_location.NETWORK_FILESYSTEMS

  data_dir = prepared / "prepared"
  src = data.source(data_dir, "train")
  home, scratch = tmp_path / "home", tmp_path / "scratch"
  home.mkdir()
  scratch.mkdir()
  monkeypatch.delenv(pixel_cache.LOCATION_ENV)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("TMPDIR", str(scratch))
  own = f"affectjax-{os.getuid()}"
  assert cache_location.auto_locations() == [
      str(home / ".cache" / "affectjax" / "pixels"),
      str(scratch / own / "pixels"), f"/tmp/{own}/pixels"]
  kinds = {}  # An injected file system type for the home directory.
  monkeypatch.setattr(cache_location, "filesystem_type", lambda path: kinds.get(
      str(path).startswith(str(home)), real(path)))
  c = _config(data_dir, "auto")
  local = pixel_cache.plan(c, src, 24)  # A local home is used as before.
  assert local.directory.startswith(str(home / ".cache"))
  batch_loaders.forget()
  for magic, name in ((0x6969, "NFS"), (0x0BD00BD0, "Lustre"),
                      (0x47504653, "GPFS"), (0xFF534D42, "CIFS"),
                      (0x19830326, "BeeGFS")):
    kinds[True] = magic
    p = pixel_cache.plan(c, src, 24)
    assert p.directory.startswith(str(scratch / own / "pixels")), (name, p)
    assert f"{home}/.cache/affectjax/pixels is on {name}" in p.reason
    assert f"is on {name}" in pixel_cache.describe(p, 0.0)
    batch_loaders.forget()
  # A folder in shared scratch that others could write is not used.
  mine = scratch / own
  assert cache_location.not_private(str(mine / "pixels")) is None
  mine.chmod(0o777)
  assert "only this user can write" in cache_location.not_private(
      str(mine / "pixels"))
  mine.chmod(0o700)
  # Named by AFFECTJAX_CACHE_DIR, a location on NFS is still used.
  monkeypatch.setenv(pixel_cache.LOCATION_ENV, str(home / "named"))
  assert pixel_cache.plan(c, src, 24).directory.startswith(
      str(home / "named" / "pixels"))


def _mountinfo(path, at, fstype, source):
  """A mountinfo file (proc(5)'s format) with a line for the mount holding
  `at` (its real device number) of type `fstype`, among others."""
  dev = os.stat(at).st_dev
  other = f"{os.major(dev) + 1}:{os.minor(dev)}"  # No real device's.
  path.write_text(
      f"22 27 {other} / /proc rw,relatime - proc proc rw\n"
      f"27 1 {other} / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
      f"61 27 {os.major(dev)}:{os.minor(dev)} / /mnt/my\\040home "
      f"rw,nosuid,nodev,relatime shared:40 master:3 - {fstype} {source} "
      "rw,user_id=1000,group_id=1000\n")
  return str(path)


@pytest.mark.parametrize("fstype, source, network", [
    ("fuse.gcsfuse", "my-bucket", "gcsfuse"),
    ("fuse.sshfs", "me@host:/data", "sshfs"),
    ("fuse.juicefs", "JuiceFS:jfs", "JuiceFS"),
    ("fuse.rclone", "remote:", "rclone"),
    ("fuse", "sshfs#me@host:/data", "sshfs"),  # A kernel without subtypes.
    ("fuse.fuse-overlayfs", "fuse-overlayfs", None),  # Rootless container.
    ("fuse", "fuse-overlayfs", None),
    ("fuseblk", "/dev/sdb1", None),  # ntfs-3g on a local disk.
])
def test_fuse_mounts_are_told_apart_by_their_mount_type(
    tmp_path, monkeypatch, fstype, source, network):
  """All FUSE file systems share statfs's f_type: the mount's type in
  /proc/self/mountinfo says whether it is a bucket or another host (a
  network file system for `auto`) or local (fuse-overlayfs)."""
  at = tmp_path / "home"
  at.mkdir()
  info = _mountinfo(tmp_path / "mountinfo", at, fstype, source)
  monkeypatch.setattr(cache_location, "filesystem_type",
                      lambda path: cache_location.FUSE_MAGIC)
  expected = fstype if fstype != "fuse" else f"fuse.{source.split('#')[0]}"
  assert cache_location.mount_type(str(at / "not" / "yet"), info) == expected
  assert cache_location.network_filesystem(str(at), info) == network
  # Another device's line is not this mount's.
  assert cache_location.mount_type("/proc", info) is None


def test_a_fuse_home_of_a_bucket_is_passed_over_and_an_overlay_root_is_not(
    prepared, tmp_path, monkeypatch):
  """Through `plan`: a home on gcsfuse goes the way of an NFS home (node-local
  scratch instead); a home on fuse-overlayfs (a rootless container) is
  used."""
  data_dir = prepared / "prepared"
  src = data.source(data_dir, "train")
  home, scratch = tmp_path / "home", tmp_path / "scratch"
  home.mkdir()
  scratch.mkdir()
  monkeypatch.delenv(pixel_cache.LOCATION_ENV)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("TMPDIR", str(scratch))
  real = cache_location.filesystem_type
  monkeypatch.setattr(cache_location, "filesystem_type", lambda path: (
      cache_location.FUSE_MAGIC if str(path).startswith(str(home))
      else real(path)))
  c = _config(data_dir, "auto")
  own = f"affectjax-{os.getuid()}"
  for fstype, source, where in (
      ("fuse.gcsfuse", "my-bucket", scratch / own / "pixels"),
      ("fuse.fuse-overlayfs", "fuse-overlayfs", home / ".cache")):
    monkeypatch.setattr(cache_location, "MOUNTINFO", _mountinfo(
        tmp_path / "mountinfo", home, fstype, source))
    p = pixel_cache.plan(c, src, 24)
    assert p.directory.startswith(str(where)), (fstype, p)
    if fstype == "fuse.gcsfuse":
      assert f"{home}/.cache/affectjax/pixels is on gcsfuse" in p.reason
    batch_loaders.forget()


def test_mount_types_from_this_machines_mountinfo(tmp_path):
  """The real /proc/self/mountinfo: the type of the mount holding a path is
  the one findmnt(8) names, and this machine's temporary directory is not
  a network file system."""
  for path in ("/proc", "/", str(tmp_path), str(tmp_path / "not" / "yet")):
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target",
         cache_location.existing(path)],
        capture_output=True, text=True, check=True).stdout.strip()
    assert cache_location.mount_type(path) == found, path
  assert cache_location.mount_type("/proc") == "proc"
  assert cache_location.network_filesystem(str(tmp_path)) is None


def test_a_build_clears_only_this_hosts_temporaries(tmp_path):
  """Where `flock` is local to each host (NFS with local locks), another
  host's build in the same directory is in progress, not stale."""
  import socket  # pylint: disable=g-import-not-at-top
  mine = tmp_path / f".x.npy.tmp-{socket.gethostname()}-99999999"
  theirs = tmp_path / ".x.npy.tmp-another-host-99999999"
  for f in (mine, theirs):
    f.write_text("")
  with pixel_cache._locked(str(tmp_path), "x.npy"):  # pylint: disable=protected-access
    pass
  assert not mine.exists() and theirs.exists()


def test_one_decision_per_host_while_a_process_holds_it(prepared, tmp_path):
  """Two real processes on one host plan the same split with different free
  space (as a sibling's build eats it): the second follows the first's
  recorded decision, both ways. Once no process holds a decision, the next
  run decides afresh."""
  data_dir = prepared / "prepared"
  env = {**os.environ, "PYTHONPATH": REPO,
         pixel_cache.LOCATION_ENV: str(tmp_path / "host")}
  procs = []

  def start(free):
    proc = subprocess.Popen(
        [sys.executable, "-c", _PLANNER, str(data_dir), str(free)], cwd=REPO,
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    line = proc.stdout.readline()
    assert line, proc.communicate()[1][-3000:]
    pixels, reason = line.rstrip("\n").split(" ", 1)
    return proc, pixels == "True", reason

  def stop(*running):
    for proc in running:
      _, err = proc.communicate("\n", timeout=60)
      assert proc.returncode == 0, err[-3000:]

  try:
    a, a_pixels, _ = start(100 << 30)
    b, b_pixels, b_reason = start(0)  # While `a` holds its decision.
    assert (a_pixels, b_pixels) == (True, True)
    assert f"decided by process {a.pid}" in b_reason, b_reason
    stop(a, b)
    c, c_pixels, _ = start(0)  # Nobody holds a decision: a fresh one.
    d, d_pixels, d_reason = start(100 << 30)
    assert (c_pixels, d_pixels) == (False, False)
    assert f"decided by process {c.pid}" in d_reason, d_reason
    [meta] = glob.glob(str(tmp_path / "host" / "pixels" / "*" / "meta.json"))
    with open(meta) as f:
      recorded = json.load(f)["pixels"]["24"]
    assert recorded["cache"] is False and recorded["pid"] == c.pid
    assert "does not fit" in recorded["reason"]
    stop(c, d)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


_PLANNER = r"""
import sys
from affectjax import cache_location, data, pixel_cache
from configs import custom_cnn
data_dir, free = sys.argv[1], int(sys.argv[2])
cache_location.free_bytes = lambda path: (free, 200 << 30)
c = custom_cnn.get_config("tiny")
c.data.dir, c.data.cache = data_dir, "auto"
p = pixel_cache.plan(c, data.source(data_dir, "train"), 24)
print(p.pixels, p.reason, flush=True)
sys.stdin.readline()  # Uses the decision until the test lets it go.
"""


def test_a_split_is_opened_once_per_process_and_buffers_go_with_the_stream(
    prepared, tmp_path, monkeypatch):
  """Evaluating a split again (while the free space figure changes) reuses
  its loader: no second open, memory map or log line; the batch buffers of
  a closed evaluation are not kept."""
  data_dir = prepared / "prepared"
  free = {"bytes": 100 << 30}
  monkeypatch.setattr(cache_location, "free_bytes",
                      lambda path: (free["bytes"], 200 << 30))
  opened = []
  real_index = pixel_cache.record_index
  monkeypatch.setattr(pixel_cache, "record_index",
                      lambda *a: opened.append(a[0]) or real_index(*a))
  for name, start in (("fits", 100 << 30), ("does not fit", 1 << 30)):
    monkeypatch.setenv(pixel_cache.LOCATION_ENV, str(tmp_path / name))
    c = _config(data_dir, "auto")
    opened.clear()
    passes = []
    with _log_lines() as lines:
      for k in range(3):
        free["bytes"] = start + k * (1 << 20)
        ds, _ = input_pipeline.eval_dataset(c, local_batch_size=24)
        passes.append(list(input_pipeline.iterate(ds)))
        assert ds.pools.released  # Closing the iterator released them.
    said = [l for l in lines if l.startswith("Pixel cache for 'val'")]
    assert len(said) == 1 and name in said[0], said
    assert len(opened) == 1, name
    for again in passes[1:]:
      for a, b in zip(passes[0], again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    # The loader this process keeps holds no batch buffer: once the
    # batches are gone, so is their memory.
    buffers = [weakref.ref(b["image"]) for p in passes for b in p]
    del passes, a, b, again
    gc.collect()
    assert all(ref() is None for ref in buffers), name


# --------------------------------------------------------------------------
# Training: the same parameters with and without the cache; 2 processes with
# the cache equal 1 process without it.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uncached_run(prepared, tmp_path_factory):
  """A training run whose cache is off because its location cannot lock
  files (flock fails with ENOLCK, as on NFS without a lock daemon): the
  uncached reference, and the lock-failure run. Returns (workdir, the
  messages it logged, the cache location)."""
  from affectjax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("uncached"))
  location = tmp_path_factory.mktemp("no_locks")
  with pytest.MonkeyPatch.context() as mp, _log_lines() as lines:
    mp.setenv(pixel_cache.LOCATION_ENV, str(location))
    mp.setattr(cache_location, "flock", _enolck)
    train.train_and_evaluate(_config(prepared / "prepared", "auto"), workdir)
  batch_loaders.forget()
  return workdir, lines, location


def test_a_location_that_cannot_lock_turns_the_cache_off_and_the_run_trains(
    prepared, uncached_run, monkeypatch):
  workdir, lines, location = uncached_run
  for split in ("train", "val"):  # One line each, saying why.
    said = [l for l in lines if l.startswith(f"Pixel cache for {split!r}")]
    assert len(said) == 1, said
    assert said[0].startswith(
        f"Pixel cache for {split!r} off (cannot lock files in {location}"
        f"/pixels (flock: {os.strerror(errno.ENOLCK)})): records are read"), (
            said[0])
  # No pixel-cache file there. (The native CPU kernels may be built under
  # the same $AFFECTJAX_CACHE_DIR, in native/, when this worker process has
  # not built them yet: a temporary name and a rename, no lock needed.)
  assert not [p for p in glob.glob(str(location / "**"), recursive=True)
              if os.path.isfile(p) and not os.path.basename(p).startswith(".")
              and not p.startswith(str(location / "native") + os.sep)]
  step, _ = use_fixtures.final_params(workdir)  # It trained to the end.
  assert step == _config(prepared / "prepared", "none").total_steps
  # A directory named explicitly that cannot lock is an error that says so.
  monkeypatch.setattr(cache_location, "flock", _enolck)
  src = data.source(prepared / "prepared", "train")
  with pytest.raises(ValueError, match="lock files in .*No locks available"):
    pixel_cache.plan(_config(prepared / "prepared", location / "named"), src,
                     24)


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
  ref_step, ref = use_fixtures.final_params(uncached_run[0])
  assert step == ref_step
  for x, y in zip(params, ref, strict=True):
    np.testing.assert_array_equal(x, y)  # Exactly.
  for a, b in zip(_val_lines(workdir), _val_lines(uncached_run[0]),
                  strict=True):
    assert (a["loss"], a["macro_f1"]) == (b["loss"], b["macro_f1"])


_READER = r"""
import os, sys, time
import numpy as np
import simplejpeg
from absl import logging
from affectjax import input_pipeline
from configs import custom_cnn
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
data_dir, cache, p, out, hold = sys.argv[1:]
real = simplejpeg.decode_jpeg
def held(*a, **k):  # Decoding waits while the test holds the file `hold`.
  while os.path.exists(hold):
    time.sleep(0.01)
  return real(*a, **k)
simplejpeg.decode_jpeg = held
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
  """Two real processes share one empty cache directory: while the first
  builds the train pixels (held mid-build by the test), the second starts,
  and must wait on the lock, not build them too. Each split is built once,
  and their slices of every global batch, side by side, are one uncached
  process's batches, bit for bit."""
  data_dir, cache = prepared / "prepared", tmp_path / "cache"
  hold = tmp_path / "hold"
  hold.write_text("")
  logs = [tmp_path / f"p{p}.log" for p in range(2)]
  procs = []

  def start(p):
    with open(logs[p], "w") as err:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", _READER, str(data_dir), str(cache), str(p),
           str(tmp_path / f"p{p}.npz"), str(hold)], cwd=REPO, stderr=err,
          env={**os.environ, "PYTHONPATH": REPO}))

  def until(what, done):
    deadline = time.monotonic() + 120
    while not done():
      for proc, log in zip(procs, logs):
        assert proc.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, f"timed out waiting for {what}"
      time.sleep(0.05)

  def waited(log):  # Whether a process logged waiting for the train pixels.
    return any("Waiting for another process building" in l and
               "train-24px.npy" in l for l in log.splitlines())

  def building(p):  # The train pixels' temporary file of process p.
    return glob.glob(str(cache / "*" / ".train-24px.npy.tmp-*"
                         f"-{procs[p].pid}"))

  try:
    start(0)
    until("process 0 to build", lambda: building(0))
    start(1)
    until("process 1 to wait or build",
          lambda: building(1) or waited(logs[1].read_text()))
    assert not building(1), "process 1 built the pixels alongside 0"
    hold.unlink()  # Process 0 finishes; process 1 reads its pixels.
    for proc in procs:
      proc.wait(timeout=120)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  errs = [log.read_text() for log in logs]
  for proc, err in zip(procs, errs):
    assert proc.returncode == 0, err[-3000:]
  assert waited(errs[1]), errs[1][-3000:]
  for split in ("train", "val"):  # One build each, by either process.
    built = [l for e in errs for l in e.splitlines()
             if "Building the pixel cache" in l and f"{split}-24px" in l]
    assert len(built) == 1, built
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
