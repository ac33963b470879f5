"""One training run per workdir: the lock file ``W/run.lock``.

Two trainers on one workdir (a resubmitted job, a second terminal, the tasks
of a launch without ``--distributed``) race each other's checkpoint saves
and log every step twice. ``affectjax.main`` takes this lock before it builds
the run (process 0 alone for a multi-process run; the others learn the
outcome from it) and gives it back when the run ends. ``evaluate``,
``predict`` and ``export`` only read a workdir and never take it.

The lock is a small JSON file naming its holder: host, pid, start time, the
SLURM job and its restart count, a random token, and a heartbeat (the wall
time, rewritten every ``HEARTBEAT_S`` by a thread of the holder). A second
trainer finds it and exits 2 at once naming the holder, unless the holder is
provably gone, and then it takes the lock over:

* on the same host (the same hostname, boot id and pid namespace): its pid
  is not running, or runs another program (the process's start time
  differs): a ``kill -9``, an OOM kill, a crash;
* the same SLURM job with a lower ``SLURM_RESTART_COUNT``: an earlier start
  of this job, which SLURM never runs beside a later one (a requeue after a
  lost node);
* on another host: its heartbeat is older than ``LEASE_S`` (a lost node, or
  a holder frozen that long). The lease is long against the heartbeat
  interval, so clocks a few seconds apart (NTP) do not matter.

A holder whose heartbeat finds the lock taken over (it was frozen for longer
than the lease and another run took its place) exits 1 at once, without
saving: two runs must not write one workdir.

Storage. On local disks and NFS the lock is created the way open(2)'s manual
recommends for NFS: written under a unique name, then ``link``ed to
``run.lock`` (atomic and exclusive on every NFS version; a lost reply is
told apart by the link count) -- no ``flock``, which NFS does not always
honour. Where ``link`` is refused (gcsfuse, some SMB and FUSE mounts) the
file is created with ``O_CREAT | O_EXCL`` instead (exclusive on NFSv3 and
later too). The heartbeat replaces the file by ``rename``. A takeover first
wins an exclusive ``run.lock.takeover-<token>`` the same way, so that two
contenders never both remove a stale lock. On ``gs://`` the lock is an
object written with generation preconditions (``if_generation_match=0`` to
create; the holder's generation to renew or delete; the stale generation to
take over), which GCS checks atomically. Other URL schemes (s3://, az://)
get no lock, with a warning.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable

from absl import logging

LOCK_NAME = "run.lock"
# How often the holder rewrites its heartbeat, and how old a heartbeat of
# another host's holder must be before that holder counts as gone.
HEARTBEAT_S = 30.0
LEASE_S = 180.0


# ``link`` errors of a file system without hard links.
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS,
                  errno.EMLINK)
# How long an unparseable lock is read again before it counts as torn (a
# writer without ``link`` fills it in microseconds).
_TORN_AFTER_S = 2.0


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir's lock."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_namespace() -> str:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (``/proc/PID/stat``
  field 22): with the pid, it names one process (pids are reused). None if
  no such process; '' where /proc is not readable."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except FileNotFoundError:
    return None
  except OSError:
    return ""
  # The command name (field 2) is in parentheses and may hold spaces.
  return stat.rsplit(")", 1)[1].split()[19]


def _now_iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(
      t, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds (or held) a lock: the lock file's content."""
  host: str
  pid: int
  started: float  # Wall time (seconds since the epoch).
  heartbeat: float
  token: str
  boot_id: str = ""
  pid_ns: str = ""
  proc_start: str = ""
  slurm_job: str = ""
  slurm_restart: int = 0

  @classmethod
  def me(cls, token: str) -> Holder:
    now = time.time()
    return cls(host=socket.gethostname(), pid=os.getpid(), started=now,
               heartbeat=now, token=token, boot_id=_boot_id(),
               pid_ns=_pid_namespace(),
               proc_start=process_start(os.getpid()) or "",
               slurm_job=os.environ.get("SLURM_JOB_ID", ""),
               slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0))

  def to_bytes(self) -> bytes:
    return (json.dumps(dataclasses.asdict(self), indent=1) + "\n").encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> Holder | None:
    """None for a file that is not a holder record (torn or foreign)."""
    try:
      fields = json.loads(data)
      return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)
                    if f.name in fields})
    except (ValueError, TypeError, KeyError):
      return None

  def describe(self) -> str:
    age = time.time() - self.heartbeat
    return (f"host {self.host}, pid {self.pid}, started "
            f"{_now_iso(self.started)}"
            + (f", SLURM job {self.slurm_job}" if self.slurm_job else "")
            + f"; heartbeat {age:.0f} s ago")

  def gone_because(self, lease_s: float) -> str | None:
    """Why this holder is certainly not running any more; None if it may be."""
    me = Holder.me("")
    if (self.host == me.host and self.boot_id == me.boot_id
        and self.pid_ns == me.pid_ns):
      if self.pid == me.pid:
        return None  # This very process (a second acquire).
      start = process_start(self.pid)
      if start is None:
        return f"pid {self.pid} is not running on this host"
      if start and self.proc_start and start != self.proc_start:
        return f"pid {self.pid} is another process now"
      return None
    if self.host == me.host and self.boot_id != me.boot_id and me.boot_id:
      return "its host has rebooted since"
    if (self.slurm_job and self.slurm_job == me.slurm_job
        and self.slurm_restart < me.slurm_restart):
      return (f"it was start {self.slurm_restart + 1} of this SLURM job, "
              f"this is start {me.slurm_restart + 1}")
    age = time.time() - self.heartbeat
    if age > lease_s:
      return f"its heartbeat stopped {age:.0f} s ago (lease {lease_s:g} s)"
    return None


class _LocalStore:
  """The lock as a file on a local disk or NFS (see the module doc)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, LOCK_NAME)

  def _create(self, path: str, data: bytes) -> bool:
    """Creates ``path`` holding ``data`` unless it exists: write a unique
    file, ``link`` it (exclusive, atomic on NFS too), drop the unique name."""
    tmp = os.path.join(self.directory,
                       f".{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}."
                       f"{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno in _NO_HARD_LINKS:
        return self._create_exclusive(path, data)
      # NFS: the link may have been made though its reply was lost.
      if os.stat(tmp).st_nlink == 2:
        return True
      raise
    finally:
      os.unlink(tmp)

  @staticmethod
  def _create_exclusive(path: str, data: bytes) -> bool:
    """``O_CREAT | O_EXCL``, for file systems without hard links (gcsfuse,
    some SMB and FUSE mounts); exclusive on local disks and NFSv3+. A reader
    may see the file before its bytes: ``acquire`` reads an unparseable lock
    again before it counts it as gone."""
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    try:
      os.write(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    return True

  def read(self, path: str | None = None) -> tuple[bytes, str] | None:
    """(content, version) of the lock; None if there is none."""
    try:
      with open(path or self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return None
    holder = Holder.from_bytes(data)
    return data, holder.token if holder else ""

  def create(self, holder: Holder) -> str | None:
    return holder.token if self._create(self.path, holder.to_bytes()) else None

  def replace(self, holder: Holder, version: str) -> str | None:
    """Rewrites the lock if it is still ``version``; None if it is not."""
    current = self.read()
    if current is None or current[1] != version:
      return None
    tmp = f"{self.path}.{holder.token}.tmp"
    with open(tmp, "wb") as f:
      f.write(holder.to_bytes())
    os.replace(tmp, self.path)
    return holder.token

  def delete(self, version: str) -> bool:
    current = self.read()
    if current is None or current[1] != version:
      return False
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      return False
    return True

  def take_over(self, stale: str, me: Holder, lease_s: float) -> bool:
    """Removes the lock if it is still the stale ``stale`` version; only one
    contender can (an exclusive takeover marker). False if another did, or
    is doing it."""
    marker = f"{self.path}.takeover-{stale or 'unreadable'}"
    if not self._create(marker, me.to_bytes()):
      other = self.read(marker)
      other_holder = Holder.from_bytes(other[0]) if other else None
      # A contender that died between marker and takeover leaves its marker;
      # it is gone by the same rules as a lock's holder.
      if other is None or other_holder is None or not other_holder.gone_because(
          lease_s):
        return False
      try:
        os.unlink(marker)
      except FileNotFoundError:
        pass
      if not self._create(marker, me.to_bytes()):
        return False
    try:
      current = self.read()
      if current is not None and current[1] == stale:
        os.unlink(self.path)
      return True
    finally:
      os.unlink(marker)


class _GcsStore:
  """The lock as a GCS object under generation preconditions."""

  def __init__(self, url: str):
    # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions
    from google.cloud import storage
    bucket, _, prefix = url[len("gs://"):].partition("/")
    self.path = f"gs://{bucket}/{prefix.rstrip('/')}/{LOCK_NAME}".replace(
        f"gs://{bucket}//", f"gs://{bucket}/")
    self._name = self.path[len(f"gs://{bucket}/"):]
    if os.environ.get("STORAGE_EMULATOR_HOST"):
      from google.auth.credentials import AnonymousCredentials
      client = storage.Client(project="affectjax",
                              credentials=AnonymousCredentials())
    else:
      client = storage.Client()
    self._bucket = client.bucket(bucket)
    self._failed = exceptions.PreconditionFailed
    self._not_found = exceptions.NotFound

  def read(self) -> tuple[bytes, int] | None:
    for _ in range(5):
      blob = self._bucket.get_blob(self._name)
      if blob is None:
        return None
      try:
        return (blob.download_as_bytes(if_generation_match=blob.generation),
                blob.generation)
      except (self._failed, self._not_found):
        continue  # Rewritten or removed between the two calls.
    return None

  def _write(self, holder: Holder, match: int) -> int | None:
    blob = self._bucket.blob(self._name)
    try:
      blob.upload_from_string(holder.to_bytes(), content_type="application/json",
                              if_generation_match=match)
    except self._failed:
      return None
    return blob.generation

  def create(self, holder: Holder) -> int | None:
    return self._write(holder, 0)

  def replace(self, holder: Holder, version: int) -> int | None:
    return self._write(holder, version)

  def delete(self, version: int) -> bool:
    try:
      self._bucket.blob(self._name).delete(if_generation_match=version)
      return True
    except (self._failed, self._not_found):
      return False

  def take_over(self, stale: int, me: Holder, lease_s: float) -> bool:
    del me, lease_s
    self.delete(stale)
    return True


def _store(workdir: str):
  if workdir.startswith("gs://"):
    return _GcsStore(workdir)
  if "://" in workdir:
    return None
  return _LocalStore(workdir)


def _exit_lost(message: str) -> None:
  """The default reaction to a lock taken over: exit 1 now, without saving."""
  sys.stderr.write(f"affectjax: {message}; stopping without saving so that "
                   "two runs do not write the same workdir (exit 1).\n")
  sys.stderr.flush()
  for child in multiprocessing.active_children():
    child.kill()
  os._exit(1)  # pylint: disable=protected-access


class RunLock:
  """The held lock of one workdir (``acquire``); ``release`` gives it back.

  A daemon thread renews the heartbeat every ``heartbeat_s``; if it finds the
  lock no longer this run's, it calls ``on_lost(message)`` (default: exit 1
  at once, see the module doc).
  """

  def __init__(self, store, holder: Holder, version, *, heartbeat_s: float,
               on_lost: Callable[[str], None]):
    self._store = store
    self.holder = holder
    self._version = version
    self._heartbeat_s = heartbeat_s
    self._on_lost = on_lost
    self.created_dir: str | None = None  # Set by ``acquire``.
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="RunLock",
                                    daemon=True)
    self._thread.start()

  @property
  def path(self) -> str:
    return self._store.path

  def _beat(self) -> None:
    while not self._done.wait(self._heartbeat_s):
      try:
        self.renew()
      except Exception as e:  # pylint: disable=broad-except
        # Storage briefly unavailable: the next beat tries again; the lease
        # is several beats long.
        logging.warning("Could not renew the workdir lock %s: %s", self.path,
                        e)

  def renew(self) -> None:
    """Rewrites the heartbeat; ``on_lost`` if another run holds the lock now."""
    holder = dataclasses.replace(self.holder, heartbeat=time.time())
    version = self._store.replace(holder, self._version)
    if version is not None:
      self.holder, self._version = holder, version
      return
    if self._done.is_set():
      return
    current = self._store.read()
    if current is None:
      version = self._store.create(holder)
      if version is not None:
        # Removed by hand (or with the workdir): this run holds it again.
        logging.warning("The workdir lock %s had been removed; created "
                        "again.", self.path)
        self.holder, self._version = holder, version
        return
      current = self._store.read()
    other = Holder.from_bytes(current[0]) if current else None
    self._on_lost(
        f"the workdir lock {self.path} was taken over by another run ("
        f"{other.describe() if other else 'unknown holder'}) while this one's "
        "heartbeat had stopped")

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this run's."""
    if self._done.is_set():
      return
    self._done.set()
    self._thread.join(timeout=10)
    try:
      self._store.delete(self._version)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not remove the workdir lock %s (%s); the next "
                      "run takes it over.", self.path, e)
    if self.created_dir:
      # A run refused at start (a typo in --config.data.dir) leaves no empty
      # workdir behind.
      try:
        os.rmdir(self.created_dir)
      except OSError:
        pass  # Not empty: the run wrote into it.

  def __enter__(self) -> RunLock:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def acquire(workdir, *, heartbeat_s: float = HEARTBEAT_S,
            lease_s: float = LEASE_S,
            on_lost: Callable[[str], None] = _exit_lost) -> RunLock | None:
  """Takes the workdir's lock, or raises ``WorkdirBusyError`` naming its
  live holder. Creates the workdir if needed (and ``release`` removes it
  again if it is still empty). None for a URL scheme without a lock (a
  warning says so)."""
  workdir = os.fspath(workdir)
  store = _store(workdir)
  if store is None:
    logging.warning("No run lock on %s (only local paths, NFS and gs://): "
                    "make sure no other trainer uses this workdir.", workdir)
    return None
  created = None
  if isinstance(store, _LocalStore) and not os.path.isdir(workdir):
    os.makedirs(workdir, exist_ok=True)
    created = workdir
  me = Holder.me(uuid.uuid4().hex)
  for _ in range(20):
    version = store.create(me)
    if version is not None:
      lock = RunLock(store, me, version, heartbeat_s=heartbeat_s,
                     on_lost=on_lost)
      lock.created_dir = created
      return lock
    current = store.read()
    if current is None:
      continue  # Released just now.
    data, stale = current
    holder = Holder.from_bytes(data)
    deadline = time.monotonic() + _TORN_AFTER_S
    while holder is None and time.monotonic() < deadline:
      time.sleep(0.1)  # Perhaps still being written (_create_exclusive).
      current = store.read()
      if current is None:
        break
      data, stale = current
      holder = Holder.from_bytes(data)
    if current is None:
      continue
    if holder is None:
      why = "it is not a lock file this version writes"
    else:
      why = holder.gone_because(lease_s)
      if why is None:
        raise WorkdirBusyError(
            f"--workdir={workdir} is in use by another training run ("
            f"{holder.describe()}): one run per workdir. Wait for it to "
            "end or stop it, or train into another --workdir. A run that "
            f"is gone is taken over once its heartbeat is {lease_s:g} s old "
            f"(on its own host at once); {store.path} names it.")
    if store.take_over(stale, me, lease_s):
      logging.warning("Took over the workdir lock %s: the run holding it (%s) "
                      "is gone: %s.", store.path,
                      holder.describe() if holder else "unreadable", why)
    else:
      time.sleep(0.2)  # Another contender is taking it over.
  raise WorkdirBusyError(
      f"--workdir={workdir}: could not take the lock {store.path} (other "
      "trainers keep taking it); one run per workdir.")
