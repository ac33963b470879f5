"""The decoded-image cache: where a split's pixels are kept on a host, whether
they fit, and building them once under a lock.

Every epoch of a JPEG dataset would otherwise read, parse and decode every
image again, although AffectNet decoded at the host size fits the RAM or the
local disk of a GPU host. `--config.data.cache` chooses:

  auto  (default) a cache in the first of these that is writable, can
        lock files and (unless named by AFFECTJAX_CACHE_DIR) is on a
        node-local file system: $AFFECTJAX_CACHE_DIR/pixels when that is
        set (it wins), else ~/.cache/affectjax/pixels, $TMPDIR/affectjax-
        <uid>/pixels, /tmp/affectjax-<uid>/pixels. The pixels are cached
        when they fit the free space there with a margin; otherwise only the
        record index is (and nothing when no location is usable);
  none  no files: read and decode the ArrayRecords every epoch;
  DIR   a cache under DIR, whatever its size (an error if it cannot fit, or
        if DIR cannot be written or locked).

Cluster file systems: `auto` passes over a location on a network or cluster
file system, or where files cannot be locked (`affectjax.cache_location`).

Files, per split under `<location>/<key>/`, where the key is a hash of the
split's shard checksums and sizes from the prepared dir's manifest.json (so
re-preparing the data starts a new cache, and the stale one of the same dir
is removed):

  meta.json           the prepared dir and split the entry belongs to, and
                      per host size S the decision whether its pixels are
                      cached, with its reason;
  <split>.index.npz   the record index (`affectjax.record_index`): where each
                      record's image bytes lie in its shard file and the
                      expression, valence and arousal of every record;
  <split>-<S>px.npy   uint8 (n, S, S, 3): every image decoded at the host size
                      S by the same decoder as the JPEG path, so its pixels are
                      bit-identical to an uncached run's;

plus hidden lock, lease and temporary files (names starting with a dot).

One decision per host. Whether the pixels are cached is decided once, under
the entry's lock, and recorded in meta.json; every process that plans the
split while another still holds that decision (a shared `flock` on its
lease file, kept for the life of the process) follows it, instead of
measuring free space that a sibling's build is eating. So all processes of
a host read the split the same way. Once no process holds it, the next run
decides again.

A batch from the cache is a vectorized gather (`np.take` from the memory
map, which releases the GIL) plus three label gathers: no Python per image.

Building: the first process to need a file takes a lock file next to it
(`flock`, released by the kernel even on kill -9), writes the file under a
temporary name, flushes it and renames it into place; processes of the same
host wait for it and then reuse it, and a later build removes temporaries a
killed build of the same host left (never another host's). A file is only
ever opened under its final name, so a killed build is never read. Each
host keeps its own cache; nothing in it depends on the process count.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import mmap
import os
import shutil
import socket
import time
from typing import Callable

import numpy as np
from absl import logging

from affectjax import cache_location
from affectjax import data
# Re-exported: callers name them as pixel_cache's.
from affectjax.cache_location import LOCATION_ENV  # pylint: disable=W0611
from affectjax.cache_location import LockUnavailable
from affectjax.record_index import RecordIndex
from affectjax import record_index as record_index_lib

# Bump when the layout of a file changes: old caches are then ignored.
FORMAT_VERSION = 1
# `auto` leaves at least this much of the location's file system free.
MARGIN_FRACTION = 0.10
MARGIN_MIN_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where a split's cache lives and whether its pixels are cached.

  `directory` is None when nothing is cached (`none`, or no usable
  location); `pixels` says whether the decoded pixels are (else only the
  record index); `reason` is the why, for the log line.
  """
  directory: str | None
  pixels: bool
  split: str
  size: int
  num_examples: int
  pixel_bytes: int
  reason: str

  @property
  def index_path(self) -> str:
    return os.path.join(self.directory, f"{self.split}.index.npz")

  @property
  def pixels_path(self) -> str:
    return os.path.join(self.directory, f"{self.split}-{self.size}px.npy")


def setting(config) -> str:
  """`config.data.cache` ('auto' for configs written before it existed)."""
  return str(config.data.get("cache", "auto")).strip() or "none"


def data_key(manifest: dict, split: str) -> str | None:
  """Hash of the split's shard checksums and sizes in the prepared dir's
  ``manifest``, or None if it has no checksums (data prepared by an old
  data_prep)."""
  shards = manifest.get("splits", {}).get(split, {}).get("shards", [])
  if not shards or any("sha256" not in s for s in shards):
    return None
  desc = {"format": FORMAT_VERSION, "split": split,
          "encoding": manifest.get("encoding"),
          "image_size": manifest.get("image_size"),
          "shards": [[s["sha256"], s.get("num_bytes")] for s in shards]}
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n < 1e11 else f"{n / 1e9:.0f} GB"


# --------------------------------------------------------------------------
# The plan: one decision per host.
# --------------------------------------------------------------------------
def plan(config, src: data.AffectNetSource, size: int) -> Plan:
  """Decides whether and where `src`'s split is cached at side `size`."""
  value = setting(config)
  n = len(src)
  pixel_bytes = n * size * size * 3
  common = dict(split=src.split, size=size, num_examples=n,
                pixel_bytes=pixel_bytes)
  if value == "none":
    return Plan(None, False, reason="--config.data.cache=none", **common)
  key = data_key(src.manifest, src.split)
  if key is None:
    reason = (f"{config.data.dir}/manifest.json has no shard checksums; "
              "re-prepare the data with `python -m data_prep.affectnet` to "
              "cache it")
    if value != "auto":
      raise ValueError(f"--config.data.cache={value}: {reason}.")
    return Plan(None, False, reason=reason, **common)
  forced = value != "auto"
  if forced:
    base = os.path.expanduser(value)
    problem = cache_location.unusable(base)
    if problem:
      raise ValueError(
          f"--config.data.cache={value}: cannot create or write that "
          f"directory, or lock files in it ({problem}); choose a writable "
          "local directory, or use --config.data.cache=auto or none.")
    passed = []
  else:
    base, passed = cache_location.auto_location()
    if base is None:
      return Plan(None, False, reason="; ".join(passed), **common)
  note = f"; {'; '.join(passed)}" if passed else ""
  directory = os.path.join(base, key[:24])
  pixels_path = os.path.join(directory, f"{src.split}-{size}px.npy")
  if os.path.exists(pixels_path):
    return Plan(directory, True, reason="built earlier, reused" + note,
                **common)

  def decide() -> tuple[bool, str]:
    free, total = cache_location.free_bytes(directory)
    if forced:
      if pixel_bytes > free:
        raise ValueError(
            f"--config.data.cache={value}: the {src.split!r} split needs "
            f"{_gb(pixel_bytes)} at {size} px, and {base} has {_gb(free)} "
            "free. Free space there, choose another directory, or use "
            "--config.data.cache=auto (caches only what fits) or none.")
      return True, f"--config.data.cache={value}"
    margin = max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * total))
    if pixel_bytes + margin <= free:
      return True, f"fits: {_gb(free)} free, keeping {_gb(margin)} free"
    return False, (f"{_gb(pixel_bytes)} at {size} px does not fit: "
                   f"{_gb(free)} free, keeping {_gb(margin)} free")

  try:
    pixels, reason = _decision(directory, config.data.dir, src.split, size,
                               decide)
  except LockUnavailable as e:
    if forced:
      raise ValueError(f"--config.data.cache={value}: {e.strerror}; choose "
                       "a local directory, or use --config.data.cache=auto "
                       "or none.") from e
    return Plan(None, False, reason=e.strerror + note, **common)
  return Plan(directory, pixels, reason=reason + note, **common)


# Lease files this process holds a shared lock on (one per split and size
# it planned), open for the life of the process: they tell other processes
# that the recorded decision is in use.
_LEASES: dict[str, object] = {}


def _decision(directory: str, data_dir, split: str, size: int,
              decide: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
  """(pixels cached?, reason) for `split` at `size` in the entry `directory`.

  Under the entry's meta.json lock: if a process still holds the recorded
  decision (a shared lock on its lease file, this process included), it is
  followed; otherwise `decide()` makes a fresh one, which is recorded. Either
  way this process then holds the lease until it exits.
  """
  lease_path = os.path.join(directory, f".{split}-{size}px.lease")
  with _locked(directory, "meta.json", "writing"):
    meta = _read_meta(directory)
    recorded = meta.get("pixels", {}).get(str(size))
    lease = _LEASES.get(lease_path)
    in_use = lease is not None
    if lease is None:
      lease = open(lease_path, "a+")  # pylint: disable=consider-using-with
    try:
      if not in_use:
        try:
          cache_location.lock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB, directory)
        except BlockingIOError:
          in_use = True  # Other processes hold it.
      if in_use and recorded is not None:
        pixels = bool(recorded["cache"])
        reason = (f"decided by process {recorded.get('pid')} on "
                  f"{recorded.get('host')}: {recorded.get('reason')}")
      else:
        pixels, reason = decide()
        meta.setdefault("pixels", {})[str(size)] = {
            "cache": pixels, "reason": reason, "host": socket.gethostname(),
            "pid": os.getpid(), "time": time.time()}
        _write_meta(directory, meta, data_dir, split)
      cache_location.lock(lease, fcntl.LOCK_SH, directory)
    except BaseException:
      if lease_path not in _LEASES:
        lease.close()
      raise
    _LEASES[lease_path] = lease
  return pixels, reason


def release_decisions() -> None:
  """Lets go of the decisions this process holds (as if it exited)."""
  while _LEASES:
    _, lease = _LEASES.popitem()
    lease.close()


def describe(p: Plan, seconds: float) -> str:
  """The one log line: where the cache is, how big, and why on or off."""
  if p.directory is None:
    return (f"Pixel cache for {p.split!r} off ({p.reason}): records are read "
            "and decoded every epoch.")
  if p.pixels:
    return (f"Pixel cache for {p.split!r} on: {p.pixels_path}, "
            f"{p.num_examples} images x {p.size} px = {_gb(p.pixel_bytes)} "
            f"({p.reason}; ready in {seconds:.1f} s).")
  return (f"Pixel cache for {p.split!r} off ({p.reason}): JPEGs decode every "
          f"epoch from the record index {p.index_path} (ready in "
          f"{seconds:.1f} s); --config.data.cache=DIR puts the cache on a "
          "larger local disk.")


# --------------------------------------------------------------------------
# Building under a lock, via temporary files.
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(directory: str, name: str, doing: str = "building"):
  """An exclusive flock on `directory/.name.lock` (freed by the kernel when
  the holder dies); also clears temporaries a killed build of this host
  left behind (another host's may be in progress where the lock is local
  to each host). `doing`: what the holder does, for the log line a waiting
  process writes."""
  os.makedirs(directory, exist_ok=True)
  lock_path = os.path.join(directory, f".{name}.lock")
  with open(lock_path, "a+") as f:
    try:
      cache_location.lock(f, fcntl.LOCK_EX | fcntl.LOCK_NB, directory)
    except BlockingIOError:
      logging.info("Waiting for another process %s %s/%s", doing, directory,
                   name)
      cache_location.lock(f, fcntl.LOCK_EX, directory)
    try:
      for stale in glob.glob(os.path.join(
          directory, f".{name}.tmp-{glob.escape(socket.gethostname())}-*")):
        os.remove(stale)  # Ours to clear: we hold the lock.
      yield
    finally:
      cache_location.flock(f, fcntl.LOCK_UN)


def _tmp_name(directory: str, name: str) -> str:
  return os.path.join(directory, f".{name}.tmp-{socket.gethostname()}-"
                      f"{os.getpid()}")


def _remove_stale_entries(base: str, directory: str, data_dir,
                          split: str) -> None:
  """Removes other keys' caches of the same split of the same prepared dir
  (its contents before it was prepared again)."""
  here = os.path.abspath(os.fspath(data_dir))
  for meta_path in glob.glob(os.path.join(base, "*", "meta.json")):
    entry = os.path.dirname(meta_path)
    if os.path.abspath(entry) == os.path.abspath(directory):
      continue
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      if (meta.get("data_dir"), meta.get("split")) != (here, split):
        continue
    except (OSError, ValueError):
      continue
    logging.info("Removing the stale pixel cache %s (%s was re-prepared)",
                 entry, here)
    shutil.rmtree(entry, ignore_errors=True)


def _read_meta(directory: str) -> dict:
  try:
    with open(os.path.join(directory, "meta.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return {}
  return meta if meta.get("format") == FORMAT_VERSION else {}


def _write_meta(directory: str, meta: dict, data_dir, split: str) -> None:
  """Writes meta.json (under the caller's meta.json lock). The prepared dir
  it names is the first one to write it (identical data prepared in two
  dirs shares one entry)."""
  meta = {"data_dir": os.path.abspath(os.fspath(data_dir)), "split": split,
          **meta, "format": FORMAT_VERSION}
  tmp = _tmp_name(directory, "meta.json")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(directory, "meta.json"))


def _save_npz(path: str, arrays: dict) -> None:
  directory, name = os.path.split(path)
  tmp = _tmp_name(directory, name)
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def record_index(p: Plan, src: data.AffectNetSource, threads: int,
                 data_dir) -> RecordIndex:
  """The split's record index from the cache, built first if need be."""
  def load():
    index = RecordIndex.load(p.index_path)
    if len(index) != len(src):
      raise ValueError(f"{p.index_path} holds {len(index)} records, the "
                       f"split {len(src)}")
    return index

  if os.path.exists(p.index_path):
    return load()
  name = os.path.basename(p.index_path)
  with _locked(p.directory, name):
    if os.path.exists(p.index_path):  # Another process built it meanwhile.
      return load()
    _remove_stale_entries(os.path.dirname(p.directory), p.directory,
                          data_dir, p.split)
    with _locked(p.directory, "meta.json", "writing"):
      if not os.path.exists(os.path.join(p.directory, "meta.json")):
        _write_meta(p.directory, {}, data_dir, p.split)
    index = record_index_lib.build(src, threads)
    _save_npz(p.index_path, index.arrays())
  return index


# --------------------------------------------------------------------------
# Pixels.
# --------------------------------------------------------------------------
class PixelCache:
  """A split's decoded uint8 pixels (memory-mapped) and labels.

  `load(indices, batch, image)` is the batch loader of the input pipeline:
  the same dict of arrays the decoding loaders return, rows past
  `len(indices)` zero; `image` is the (batch, S, S, 3) buffer to gather
  into (a fresh one if None).
  """

  def __init__(self, pixels: np.ndarray, index: RecordIndex):
    self.pixels = pixels
    self.expression = index.expression
    self.valence = index.valence
    self.arousal = index.arousal

  def __len__(self) -> int:
    return len(self.pixels)

  def load(self, indices: np.ndarray, batch: int,
           image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    k = idx.size
    if k and (idx.min() < 0 or idx.max() >= len(self.pixels)):
      raise IndexError(f"index out of range for a cache of {len(self)} images")
    if image is None:
      image = np.empty((batch,) + self.pixels.shape[1:], np.uint8)
    # mode='clip' (the indices are checked above): numpy buffers `out` for
    # the default mode='raise', an extra copy of the batch.
    np.take(self.pixels, idx, axis=0, out=image[:k], mode="clip")
    image[k:] = 0
    out = {"image": image}
    for name in ("expression", "valence", "arousal"):
      col = getattr(self, name)
      out[name] = np.zeros((batch,), col.dtype)
      out[name][:k] = col[idx]
    return out


def _open_pixels(path: str, shape: tuple) -> np.ndarray | None:
  """The pixel file memory-mapped read-only (None if absent or not `shape`).

  When it fits in half the available memory, the mapping is populated up
  front (`MAP_POPULATE`: read into the page cache and mapped in one pass),
  so batches never take a page fault.
  """
  try:
    header = np.load(path, mmap_mode="r")
  except (OSError, ValueError):
    return None
  if header.shape != shape or header.dtype != np.uint8:
    return None
  populate = getattr(mmap, "MAP_POPULATE", 0)
  if not populate or header.nbytes > cache_location.available_memory() // 2:
    return header
  with open(path, "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | populate,
                   prot=mmap.PROT_READ)
  return np.frombuffer(mm, np.uint8, count=header.size,
                       offset=header.offset).reshape(shape)


def pixels(p: Plan, index: RecordIndex,
           fill: Callable[[np.ndarray, np.ndarray], None],
           threads: int, chunk: int = 256) -> PixelCache:
  """The split's pixel cache, built first if need be.

  `fill(indices, out)` decodes the images at `indices` into the uint8
  array `out` (the input pipeline's own decoder); the build runs it on
  `threads` threads over chunks of `chunk` images.
  """
  shape = (p.num_examples, p.size, p.size, 3)
  cached = _open_pixels(p.pixels_path, shape)
  if cached is not None:
    return PixelCache(cached, index)
  name = os.path.basename(p.pixels_path)
  with _locked(p.directory, name):
    cached = _open_pixels(p.pixels_path, shape)
    if cached is None:
      logging.info("Building the pixel cache %s (%d images)", p.pixels_path,
                   shape[0])
      tmp = _tmp_name(p.directory, name)
      out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                      shape=shape)

      def work(a: int) -> None:
        fill(np.arange(a, min(shape[0], a + chunk)), out[a:a + chunk])

      with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for job in [pool.submit(work, a) for a in range(0, shape[0], chunk)]:
          job.result()
      out.flush()
      del out
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
      os.replace(tmp, p.pixels_path)
      cached = _open_pixels(p.pixels_path, shape)
  return PixelCache(cached, index)
