"""Where a host can keep its pixel cache: the candidate locations, what file
system each is on, whether files there can be locked, and how much space is
free.

Cluster file systems. A home directory on NFS, Lustre, GPFS, CIFS/SMB,
BeeGFS, CephFS, ... (statfs(2)'s f_type, `filesystem_type`), or on a FUSE
mount of a bucket or another host (gcsfuse, sshfs, JuiceFS, ...: the
mount's type in /proc/self/mountinfo, `network_filesystem`; fuse-overlayfs,
a rootless container's root, is local) is skipped by `auto` for node-local
scratch: the cache is per host, a network file
system's `flock` may be missing (ENOLCK, ENOSYS, EOPNOTSUPP) or only local
to each host, and its pages travel the network. A location where `flock`
fails is not used either: `auto` moves on to the next one (with none left,
the cache is off and the log line says why); a named DIR is an error.

Which location `auto` takes and what goes there is `affectjax.pixel_cache`'s.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import shutil
import stat
import sys

# Set, it is `auto`'s location (its `pixels` folder), whatever the file
# system; the test suite points it at a temporary directory of its own.
LOCATION_ENV = "AFFECTJAX_CACHE_DIR"
# statfs(2) f_type of file systems shared over a network or by a cluster
# (linux/magic.h and the vendors' own values).
NETWORK_FILESYSTEMS = {
    0x6969: "NFS", 0x517B: "SMB", 0xFF534D42: "CIFS", 0xFE534D42: "SMB2",
    0x0BD00BD0: "Lustre", 0x47504653: "GPFS", 0x19830326: "BeeGFS",
    0x00C36400: "CephFS", 0x6B414653: "AFS", 0x5346414F: "OpenAFS",
    0xAAD7AAEA: "PanFS", 0x01161970: "GFS2", 0x7461636F: "OCFS2",
    0x73757245: "Coda", 0x564C: "NCP", 0x01021997: "9p",
}
# File systems in memory: their free space is at most the available memory.
MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}
# statfs(2) f_type of every FUSE file system (FUSE_SUPER_MAGIC): a bucket
# (gcsfuse), another host (sshfs), a cluster (JuiceFS) or a rootless
# container's own root (fuse-overlayfs, local) alike. Which one it is, only
# the mount's type in /proc/self/mountinfo says: "fuse.<name>" (or "fuse",
# with the name as the mount's source, where the kernel had no subtypes).
FUSE_MAGIC = 0x65735546
# The FUSE file systems whose files are on other machines, by that name.
NETWORK_FUSE = {
    "gcsfuse": "gcsfuse", "sshfs": "sshfs", "juicefs": "JuiceFS",
    "s3fs": "s3fs", "rclone": "rclone", "goofys": "goofys",
    "blobfuse": "blobfuse", "blobfuse2": "blobfuse2", "ceph": "CephFS",
    "ceph-fuse": "CephFS", "glusterfs": "GlusterFS", "mfs": "MooseFS",
}
MOUNTINFO = "/proc/self/mountinfo"
# What flock raises where the file system cannot lock.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class LockUnavailable(OSError):
  """`flock` is not supported where the cache would be written."""


def existing(path: str) -> str:
  """`path` made absolute, or its nearest parent that exists (a location
  is asked about before it is made)."""
  p = os.path.abspath(path)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  return p


def filesystem_type(path: str) -> int | None:
  """statfs(2)'s f_type of the file system holding `path` (or its nearest
  existing parent); None where it cannot be asked (not Linux).

  Asked of the kernel for the path itself rather than looked up in
  /proc/mounts: that follows symlinks (a ~/.cache linked to scratch),
  bind mounts, automounted homes and container mount namespaces, with no
  mount-point matching or escaped names to get wrong.
  """
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
  buf = ctypes.create_string_buffer(512)  # > sizeof(struct statfs).
  if libc.statfs(os.fsencode(existing(path)), buf) != 0:
    return None
  # f_type is the first field: a word, except s390x's unsigned int.
  kind = ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_ulong
  return int(kind.from_buffer(buf).value) & 0xFFFFFFFF


def mount_type(path: str, mountinfo: str | None = None) -> str | None:
  """The type of the mount holding `path` (or its nearest existing parent)
  as the file `mountinfo` (proc(5)'s /proc/self/mountinfo format, that
  file by default: `MOUNTINFO`) names it: "ext4", "fuse.gcsfuse",
  "fuse.fuse-overlayfs", ...; None where it cannot be read or has no line
  for it.

  The mount is found by its device number (st_dev is the mountinfo line's
  major:minor), not by matching mount points: like statfs, that follows
  symlinks and bind mounts, and no escaped name can be misread. A FUSE
  mount without a subtype ("fuse") is named by its source ("fuse.<source>").
  """
  try:
    dev = os.stat(existing(path)).st_dev
    with open(mountinfo or MOUNTINFO, encoding="utf-8",
              errors="replace") as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  want = f"{os.major(dev)}:{os.minor(dev)}"
  for line in lines:
    # ID parent major:minor root mount-point options [optional...] - type
    # source super-options
    fields = line.split()
    if len(fields) < 7 or fields[2] != want or "-" not in fields[6:]:
      continue
    rest = fields[fields.index("-", 6) + 1:]
    if not rest:
      continue
    if rest[0] == "fuse" and len(rest) > 1:
      return f"fuse.{rest[1].split('#', 1)[0]}"
    return rest[0]
  return None


def network_filesystem(path: str, mountinfo: str | None = None) -> str | None:
  """The name of the network or cluster file system holding `path`, or None
  (a local one, or one that cannot be asked).

  statfs's f_type names most of them (`NETWORK_FILESYSTEMS`); all FUSE
  file systems share one, so for those the mount's type in `mountinfo`
  says which (`NETWORK_FUSE`): gcsfuse, sshfs, JuiceFS, ... are network
  file systems, fuse-overlayfs (a rootless container's root) is local.
  """
  kind = filesystem_type(path)
  if kind != FUSE_MAGIC:
    return NETWORK_FILESYSTEMS.get(kind)
  fstype = mount_type(path, mountinfo) or ""
  return NETWORK_FUSE.get(fstype[len("fuse."):] if fstype.startswith(
      "fuse.") else None)


def own_folder() -> str:
  """This user's folder in a shared scratch directory."""
  return f"affectjax-{os.getuid()}"


def root() -> str:
  """The per-user cache folder: ``$AFFECTJAX_CACHE_DIR``, else
  ``~/.cache/affectjax`` (the pixel cache's first choice, the native
  kernels' builds)."""
  env = os.environ.get(LOCATION_ENV)
  return os.path.expanduser(env or os.path.join("~", ".cache", "affectjax"))


def auto_locations() -> list[str]:
  """`auto`'s candidate locations, in order (see `affectjax.pixel_cache`)."""
  if os.environ.get(LOCATION_ENV):
    return [os.path.join(root(), "pixels")]
  own = own_folder()
  found = [os.path.join(root(), "pixels")]
  if os.environ.get("TMPDIR"):
    found.append(os.path.join(os.environ["TMPDIR"], own, "pixels"))
  found.append(os.path.join("/tmp", own, "pixels"))
  return list(dict.fromkeys(os.path.abspath(p) for p in found))


def flock(f, operation: int) -> None:
  """`fcntl.flock` (one place, so tests can make it fail)."""
  fcntl.flock(f, operation)


def lock(f, operation: int, where: str) -> None:
  """`flock`, raising `LockUnavailable` where the file system cannot lock."""
  try:
    flock(f, operation)
  except BlockingIOError:
    raise
  except OSError as e:
    if e.errno in _NO_LOCKS:
      raise LockUnavailable(
          e.errno, f"cannot lock files in {where} (flock: "
          f"{e.strerror or e})") from e
    raise


def unusable(base: str) -> str | None:
  """Why `base` cannot hold a cache (not writable, cannot lock), or None."""
  try:
    os.makedirs(base, exist_ok=True)
    writable = os.access(base, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  if not writable:
    return f"{base} is not writable"
  try:
    with open(os.path.join(base, ".lock-probe"), "a+") as f:
      try:
        lock(f, fcntl.LOCK_EX | fcntl.LOCK_NB, base)
        flock(f, fcntl.LOCK_UN)
      except BlockingIOError:
        pass  # Another process holds it: locks work.
  except LockUnavailable as e:
    return e.strerror
  return None


def auto_location() -> tuple[str | None, list[str]]:
  """(`auto`'s location or None, why each earlier candidate was passed)."""
  named = bool(os.environ.get(LOCATION_ENV))
  passed = []
  for base in auto_locations():
    kind = None if named else network_filesystem(base)
    if kind:
      passed.append(f"{base} is on {kind}")
      continue
    problem = not_private(base) or unusable(base)
    if problem:
      passed.append(problem)
      continue
    return base, passed
  return None, passed


def not_private(base: str) -> str | None:
  """In a shared scratch directory (/tmp), why this user's folder above
  `base` could hold files of another user (who could then plant pixels),
  or None: it must be a real directory of this user that only it can
  write."""
  parts = base.split(os.sep)
  if own_folder() not in parts:
    return None
  own = os.sep.join(parts[:parts.index(own_folder()) + 1])
  try:
    os.makedirs(own, mode=0o700, exist_ok=True)
    st = os.lstat(own)
  except OSError as e:
    return f"{own} cannot be made ({e.strerror})"
  if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
      or st.st_mode & 0o022):
    return f"{own} is not a directory only this user can write"
  return None


def available_memory() -> int:
  """MemAvailable of /proc/meminfo in bytes (0 where it cannot be read)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def free_bytes(path: str) -> tuple[int, int]:
  """(free, total) bytes of the file system holding `path` (or its parent);
  on tmpfs, free is at most the available memory (its pages are RAM)."""
  p = existing(path)
  usage = shutil.disk_usage(p)
  free = usage.free
  if filesystem_type(p) in MEMORY_FILESYSTEMS and available_memory():
    free = min(free, available_memory())
  return free, usage.total
