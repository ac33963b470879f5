"""One training run per workdir (affectjax.run_lock), with real processes: a
second trainer is refused naming the holder, a lock left by kill -9 is taken
over, the heartbeat renews, a holder whose lock was taken exits, a lock on
another host is judged by its heartbeat, a 2-process run holds it once, and
the tools that only read a workdir never take it."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from affectjax import run_lock
from tests import use_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the lock of argv[1] with a heartbeat every argv[2] s until killed.
_HOLDER = """
import sys, time
from affectjax import run_lock
lock = run_lock.acquire(sys.argv[1], heartbeat_s=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return {**env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **extra}


def _hold(procs, tmp_path, workdir, heartbeat_s=30.0, env=None):
  script = tmp_path / "holder.py"
  script.write_text(textwrap.dedent(_HOLDER))
  p = subprocess.Popen([sys.executable, str(script), str(workdir),
                        str(heartbeat_s)], cwd=REPO, env=env or _env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  procs.append(p)
  line = p.stdout.readline()
  assert line == "held\n", (line, p.communicate(timeout=30)[1][-3000:])
  return p


def _lock(workdir) -> dict:
  with open(os.path.join(workdir, run_lock.LOCK_NAME)) as f:
    return json.load(f)


def _trainer(data_dir, workdir, *flags, env=None):
  return subprocess.Popen(
      [sys.executable, "-m", "affectjax.main",
       f"--config={use_fixtures.TINY}:tiny", f"--config.data.dir={data_dir}",
       f"--workdir={workdir}", "--config.total_steps=3", *flags],
      cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def test_second_trainer_is_refused_naming_the_holder(
    procs, tmp_path, synthetic_arrayrecord):
  workdir = tmp_path / "run"
  holder = _hold(procs, tmp_path, workdir)
  t0 = time.monotonic()
  p = _trainer(synthetic_arrayrecord, workdir)
  procs.append(p)
  out, err = p.communicate(timeout=120)
  seconds = time.monotonic() - t0
  assert p.returncode == 2, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("affectjax.main:")]
  assert len(lines) == 1, err[-3000:]
  assert "is in use by another training run" in lines[0]
  assert f"host {socket.gethostname()}, pid {holder.pid}, started " in lines[0]
  assert "Traceback" not in err
  assert seconds < 60, seconds  # At start, before building the model.
  assert not (workdir / "checkpoints").exists()
  assert _lock(workdir)["pid"] == holder.pid  # Untouched.
  del out


def test_lock_of_a_killed_run_is_taken_over_and_released_at_the_end(
    procs, tmp_path, synthetic_arrayrecord):
  """kill -9 leaves the lock behind; its pid is gone on this host, so the
  next trainer takes it over at once, trains, and removes it when done."""
  workdir = tmp_path / "run"
  holder = _hold(procs, tmp_path, workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert _lock(workdir)["pid"] == holder.pid  # Left behind.
  p = _trainer(synthetic_arrayrecord, workdir)
  procs.append(p)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert "Took over the workdir lock" in err, err[-3000:]
  assert f"pid {holder.pid} is not running on this host" in err
  assert not (workdir / run_lock.LOCK_NAME).exists()  # Released.


def test_heartbeat_renews_and_a_taken_lock_stops_its_holder(procs, tmp_path):
  workdir = tmp_path / "run"
  holder = _hold(procs, tmp_path, workdir, heartbeat_s=0.2)
  first = _lock(workdir)
  deadline = time.monotonic() + 20
  while _lock(workdir)["heartbeat"] <= first["heartbeat"]:
    assert time.monotonic() < deadline, "no heartbeat within 20 s"
    time.sleep(0.05)
  assert _lock(workdir)["token"] == first["token"]
  # Another run takes the lock (as after this one froze past the lease): the
  # holder notices at its next beat and exits 1 without writing more.
  other = {**first, "pid": 1, "token": "someone-else", "host": "node-b"}
  tmp = workdir / "other.tmp"
  tmp.write_text(json.dumps(other))
  os.replace(tmp, workdir / run_lock.LOCK_NAME)
  _, err = holder.communicate(timeout=30)
  assert holder.returncode == 1, err[-3000:]
  assert "was taken over by another run (host node-b, pid 1" in err, err
  assert _lock(workdir)["token"] == "someone-else"


def _foreign(workdir, **fields):
  """A lock written by a run on another host."""
  holder = dataclasses.replace(run_lock.Holder.me("t-foreign"),
                               host="node-b", pid=4242, boot_id="b",
                               pid_ns="", proc_start="", **fields)
  os.makedirs(workdir, exist_ok=True)
  (workdir / run_lock.LOCK_NAME).write_bytes(holder.to_bytes())


def test_another_hosts_lock_counts_until_its_lease_ends(tmp_path):
  workdir = tmp_path / "run"
  _foreign(workdir)  # Heartbeat now.
  with pytest.raises(run_lock.WorkdirBusyError, match=r"host node-b, pid 4242"):
    run_lock.acquire(workdir, lease_s=60)
  _foreign(workdir, heartbeat=time.time() - 61)
  with run_lock.acquire(workdir, lease_s=60) as lock:
    assert _lock(workdir)["token"] == lock.holder.token
    assert not [n for n in os.listdir(workdir) if "takeover" in n]
  assert not (workdir / run_lock.LOCK_NAME).exists()


def test_an_earlier_start_of_the_same_slurm_job_is_gone(tmp_path, monkeypatch):
  """SLURM never runs two starts of a job at once: after a requeue from a
  lost node the lock of start 1 is taken over at once, heartbeat or not."""
  workdir = tmp_path / "run"
  _foreign(workdir, slurm_job="77", slurm_restart=0)
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
  with pytest.raises(run_lock.WorkdirBusyError):
    run_lock.acquire(workdir)  # The same start: alive.
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  run_lock.acquire(workdir).release()


_TWO_PROCESSES = """
import sys
from affectjax import distributed
from affectjax import main
a = dict(x.lstrip("-").split("=", 1) for x in sys.argv[2:])
distributed.initialize(coordinator_address=a["coordinator_address"],
                       num_processes=2, process_id=int(a["process_id"]))
try:
  lock = main._lock_workdir(sys.argv[1])
except Exception as e:
  print("refused:", type(e).__name__, e, flush=True)
  sys.exit(2)
print("lock", lock is not None, flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_two_process_run_holds_the_lock_once(procs, tmp_path):
  """Process 0 takes it; process 1 takes nothing, but is refused with it."""
  script = tmp_path / "two.py"
  script.write_text(textwrap.dedent(_TWO_PROCESSES))
  workdir = tmp_path / "run"

  outs = []
  port = _free_port()
  ps = [subprocess.Popen(
      [sys.executable, str(script), str(workdir),
       f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"],
      cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
  procs.extend(ps)
  for p in ps:
    out, err = p.communicate(timeout=120)
    outs.append(out)
    assert p.returncode == 0, err[-3000:]
  assert outs == ["lock True\n", "lock False\n"], outs

  # Busy: both processes refuse, with process 0's message.
  holder = _hold(procs, tmp_path, tmp_path / "busy")
  workdir = tmp_path / "busy"
  port = _free_port()
  ps = [subprocess.Popen(
      [sys.executable, str(script), str(workdir),
       f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"],
      cwd=REPO, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
  procs.extend(ps)
  for p in ps:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err[-3000:]
    assert f"refused: UsageError --workdir={workdir} is in use" in out, out
    assert f"pid {holder.pid}" in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_arrayrecord):
  return use_fixtures.trained_workdir(tmp_path_factory, synthetic_arrayrecord)


def test_evaluate_reads_a_workdir_a_trainer_holds(procs, tmp_path, trained):
  """evaluate, predict and export only read a workdir: they never take (or
  wait for) its lock."""
  holder = _hold(procs, tmp_path, trained)
  try:
    before = _lock(trained)
    p = subprocess.run(
        [sys.executable, "-m", "affectjax.evaluate", f"--workdir={trained}",
         f"--output_dir={tmp_path / 'eval'}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _lock(trained)["token"] == before["token"]
    assert holder.poll() is None
  finally:
    holder.kill()
    holder.wait()
    os.unlink(trained / run_lock.LOCK_NAME)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The GCS emulator (generation preconditions included), this process's
  clients pointed at it."""
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  mp = pytest.MonkeyPatch()
  with gcs_emulator.Emulator(log, buckets=("bucket",),
                             deadline_s=600) as emulator:
    for k, v in emulator.env().items():
      mp.setenv(k, v)
    yield emulator
    mp.undo()


def test_lock_on_gcs_is_an_object_under_generation_preconditions(
    procs, tmp_path, gcs):
  from etils import epath  # pylint: disable=g-import-not-at-top
  url = "gs://bucket/run"
  obj = epath.Path(url) / run_lock.LOCK_NAME
  holder = _hold(procs, tmp_path, url, heartbeat_s=0.2, env=_env(**gcs.env()))
  first = json.loads(obj.read_text())
  assert first["pid"] == holder.pid
  with pytest.raises(run_lock.WorkdirBusyError, match=f"pid {holder.pid}"):
    run_lock.acquire(url)
  deadline = time.monotonic() + 20
  while json.loads(obj.read_text())["heartbeat"] <= first["heartbeat"]:
    assert time.monotonic() < deadline, "no heartbeat on gs:// within 20 s"
    time.sleep(0.1)
  holder.send_signal(signal.SIGKILL)  # Its lock stays; its pid is gone.
  holder.wait()
  with run_lock.acquire(url) as lock:
    assert json.loads(obj.read_text())["token"] == lock.holder.token
    lock.renew()
    assert json.loads(obj.read_text())["token"] == lock.holder.token
  assert not obj.exists()


def test_without_hard_links_the_lock_is_created_exclusively(
    tmp_path, monkeypatch):
  """gcsfuse and some FUSE/SMB mounts refuse link(2): O_CREAT|O_EXCL then."""
  import errno  # pylint: disable=g-import-not-at-top

  def no_link(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted", src)

  monkeypatch.setattr(os, "link", no_link)
  workdir = tmp_path / "run"
  with run_lock.acquire(workdir) as lock:
    assert _lock(workdir)["token"] == lock.holder.token
    with pytest.raises(run_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
      run_lock.acquire(workdir)
  assert not (workdir / run_lock.LOCK_NAME).exists()


def test_a_lock_file_still_empty_is_read_again_then_taken_over(tmp_path):
  """An O_EXCL writer's file is empty for a moment: not taken at once; one
  that stays torn is."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / run_lock.LOCK_NAME).write_bytes(b"")
  t0 = time.monotonic()
  with run_lock.acquire(workdir) as lock:
    assert time.monotonic() - t0 >= run_lock._TORN_AFTER_S  # pylint: disable=protected-access
    assert _lock(workdir)["token"] == lock.holder.token


def test_a_run_refused_at_start_leaves_no_workdir(tmp_path):
  """The lock comes before the trainer's own checks; a run refused there (a
  data dir that does not exist) leaves no empty workdir behind."""
  p = _trainer(tmp_path / "no_data", tmp_path / "run")
  _, err = p.communicate(timeout=120)
  assert p.returncode == 2, err[-3000:]
  assert "manifest.json" in err, err[-3000:]
  assert not (tmp_path / "run").exists()
