"""StopRequest with real signals; a signal during the trainer's start-up;
process setup (device ids, SIGTERM, compile cache)."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from affectjax import distributed, preemption, signal_rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.01)
  return predicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_requests_a_stop_and_handlers_come_back(sig):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with preemption.StopRequest(abort_after_s=None) as stop:
    assert not stop.should_stop(1) and stop.signal_name is None
    os.kill(os.getpid(), sig)  # A real signal to this process.
    step = 1
    while not stop.should_stop(step):
      step += 1
      assert step < 10_000, "the signal never reached should_stop"
      time.sleep(0.001)
    assert stop.signal_name == sig.name
    assert stop.should_stop(step + 1)  # Stays stopped.
  assert {s: signal.getsignal(s) for s in before} == before


def _script(body: str, tmp_path) -> str:
  path = tmp_path / "child.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


# The main thread hangs inside C (relocking a plain pthread mutex: GIL
# released, never interrupted by signals), as it does in a collective waiting
# for a dead peer: Python-level signal handlers never run there.
_HUNG_MAIN = """
import ctypes, sys
from affectjax import preemption
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(64)  # All zeros: PTHREAD_MUTEX_INITIALIZER.
with preemption.StopRequest(abort_after_s=float(sys.argv[1])):
  libc.pthread_mutex_lock(mutex)
  print("ready", flush=True)
  libc.pthread_mutex_lock(mutex)  # Deadlocks here, inside C.
"""


@pytest.fixture
def reap():
  """Kills, at teardown, the subprocesses a failing test left running."""
  procs = []
  yield procs.append
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _start_hung(tmp_path, abort_after_s, reap):
  proc = subprocess.Popen(
      [sys.executable, _script(_HUNG_MAIN, tmp_path), str(abort_after_s)],
      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  reap(proc)
  assert proc.stdout.readline() == "ready\n", proc.communicate()[1][-2000:]
  return proc


def test_second_signal_aborts_a_hung_process_at_once(tmp_path, reap):
  proc = _start_hung(tmp_path, abort_after_s=600, reap=reap)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  assert proc.poll() is None  # The first one only asks for a stop.
  t0 = time.monotonic()
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert time.monotonic() - t0 < 10
  assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
  assert "second signal (SIGINT) while stopping" in err


def test_one_signal_aborts_a_hung_process_after_the_grace_period(tmp_path,
                                                                  reap):
  proc = _start_hung(tmp_path, abort_after_s=1, reap=reap)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "no step finished within 1 s of SIGTERM" in err


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_ends_a_process_after_jax_distributed_initialize(tmp_path,
                                                                 reap):
  """jax.distributed installs a C++ SIGTERM handler that swallows the signal."""
  script = _script("""
      import sys, time
      from affectjax import distributed
      distributed.initialize(coordinator_address=sys.argv[1], num_processes=1,
                             process_id=0)
      print("ready", flush=True)
      time.sleep(60)
      """, tmp_path)
  proc = subprocess.Popen(
      [sys.executable, script, f"127.0.0.1:{_free_port()}"], cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  reap(proc)
  assert proc.stdout.readline() == "ready\n", proc.communicate()[1][-2000:]
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=20)
  except subprocess.TimeoutExpired:
    pytest.fail("SIGTERM was swallowed after jax.distributed.initialize")
  assert proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize("environ, flag, expected", [
    ({}, None, None),
    ({}, "2,3", [2, 3]),
    ({"JAX_LOCAL_DEVICE_IDS": "1"}, None, [1]),
    ({"JAX_LOCAL_DEVICE_IDS": "1"}, "0", [0]),  # The flag wins.
    # SLURM --ntasks-per-node=8 --gpus-per-task=1: each task sees one GPU,
    # which is device 0 of that process whatever its SLURM_LOCALID.
    ({"CUDA_VISIBLE_DEVICES": "5", "SLURM_LOCALID": "5",
      "SLURM_NTASKS_PER_NODE": "8"}, None, [0]),
    # SLURM, one task per node seeing all 8 GPUs: all of them (JAX alone
    # would take only GPU 0).
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_LOCALID": "0",
      "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, None, list(range(8))),
    # SLURM, 8 tasks sharing 8 visible GPUs (--gpus-per-node=8): one each.
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_LOCALID": "3",
      "SLURM_NTASKS_PER_NODE": "8"}, None, [3]),
    # Open MPI, 2 ranks on a node sharing 4 GPUs: two each.
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, None, [2, 3]),
    # No launcher: JAX's default (every visible device).
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, None, None),
])
def test_local_device_ids(environ, flag, expected):
  assert distributed.resolve_local_device_ids(flag, environ) == expected


def test_local_device_ids_errors_name_the_flag():
  with pytest.raises(ValueError, match="--local_device_ids='0,x'"):
    distributed.resolve_local_device_ids("0,x", {})
  with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS='1,1'"):
    distributed.resolve_local_device_ids(None, {"JAX_LOCAL_DEVICE_IDS": "1,1"})
  with pytest.raises(ValueError, match="3 processes on this node share 4"):
    distributed.resolve_local_device_ids(None, {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_LOCALID": "0",
        "SLURM_NTASKS_PER_NODE": "3"})


def test_compilation_cache_is_written_where_asked(tmp_path):
  """A real compile in a fresh process lands in the configured directory."""
  cache = tmp_path / "cache"
  script = _script("""
      import sys
      import jax
      from affectjax import distributed
      assert distributed.enable_compilation_cache("") is None
      used = distributed.enable_compilation_cache(sys.argv[1])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
      print(used, float(jax.jit(lambda x: (x * 2).sum())(jax.numpy.ones(3))))
      """, tmp_path)
  out = subprocess.run(
      [sys.executable, script, str(cache)], cwd=REPO, capture_output=True,
      text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == [str(cache), "6.0"]
  assert os.listdir(cache), "nothing was cached"


# affectjax.main with the training replaced by one outcome each: the exit
# status schedulers see (no training needed for that).
_MAIN_WITH_OUTCOME = """
import os, sys
from affectjax import main, train

def outcome(config, workdir):
  what = os.environ["OUTCOME"]
  if what == "preempted":
    return {"preempted": True, "step": 3, "signal": "SIGTERM"}
  if what == "exit_75":  # A failure that happens to carry the status.
    sys.exit(75)
  raise RuntimeError("a crash")

train.train_and_evaluate = outcome
sys.argv[0] = "affectjax.main"
main.run()
"""


@pytest.mark.parametrize("outcome, flags, status", [
    # The default, 75, is what the SIGTERM tests of test_end_to_end.py see.
    ("preempted", ["--preempted_exit_code=3"], 3),
    ("exit_75", [], 1),
    # Refused (a failure's status): a flag that cannot work, exit 2.
    ("preempted", ["--preempted_exit_code=1"], 2),
])
def test_exit_status_tells_preemption_from_failure(tmp_path, outcome, flags,
                                                   status):
  out = subprocess.run(
      [sys.executable, "-c", _MAIN_WITH_OUTCOME,
       "--config=configs/custom_cnn.py:tiny", f"--workdir={tmp_path}",
       "--config.compilation_cache_dir=", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "OUTCOME": outcome})
  assert out.returncode == status, out.stderr[-2000:]
  if flags == ["--preempted_exit_code=1"]:
    assert "--preempted_exit_code=1: use 0 or 3-125" in out.stderr
    assert "Stopped by" not in out.stdout
  elif outcome == "preempted":
    assert out.stdout.strip() == (
        "Stopped by SIGTERM at step 3 after saving a checkpoint; rerun the "
        "same command to resume (exit status 3).")
  else:
    assert "exit status 75 from a failure, not from a stop request" in out.stderr


# --------------------------------------------------------------------------
# A signal during the trainer's start-up (imports, jax.distributed, model
# build, compile): the run stops before its first step and exits 75 without
# a checkpoint, like any stop, so a scheduler's requeue rule sees it.
# --------------------------------------------------------------------------
TINY = "configs/custom_cnn.py"


def _caught_signals(pid: int) -> int:
  """The process's mask of signals with a handler (/proc/PID/status SigCgt)."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("SigCgt:"):
        return int(line.split()[1], 16)
  return 0


def _trainer(data_dir, workdir, *extra, devices=1):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen(
      [sys.executable, "-m", "affectjax.main", f"--config={TINY}:tiny",
       f"--config.data.dir={data_dir}", f"--workdir={workdir}",
       "--config.total_steps=4", "--config.compilation_cache_dir=", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _wait_for_line(proc, needle, timeout=180):
  """Reads stderr until a line contains ``needle``; returns what it read."""
  seen = []
  deadline = time.monotonic() + timeout
  for line in proc.stderr:
    seen.append(line)
    if needle in line:
      return "".join(seen)
    assert time.monotonic() < deadline, "".join(seen)[-3000:]
  out, err = proc.communicate()
  pytest.fail(f"exited {proc.returncode} before {needle!r}: "
              f"{''.join(seen)[-3000:]}{err[-2000:]}")


def _assert_stopped_before_the_first_step(proc, workdir, by="SIGTERM",
                                          printed=True, timeout=180):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 75, f"exit {proc.returncode}: {err[-3000:]}"
  expected = (f"Stopped by {by} before the first step (nothing new to save); "
              "rerun the same command to resume (exit status 75).")
  assert (expected in out.splitlines()) == printed, out[-2000:]
  assert not (workdir / "checkpoints").exists() or not [
      d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert "Traceback" not in err, err[-3000:]


def test_sigterm_while_importing_stops_before_the_first_step(
    synthetic_arrayrecord, tmp_path, reap):
  """The signal arrives as soon as the trainer has a handler: while Python
  is still importing JAX (before, SIGTERM killed it: exit 143)."""
  proc = _trainer(synthetic_arrayrecord, tmp_path / "wd")
  reap(proc)
  assert _wait_for(lambda: proc.poll() is not None
                   or _caught_signals(proc.pid) & (1 << (signal.SIGTERM - 1)),
                   timeout=60), "no SIGTERM handler within 60 s"
  proc.send_signal(signal.SIGTERM)
  _assert_stopped_before_the_first_step(proc, tmp_path / "wd")


@pytest.mark.slow  # Up to a model build and compile.
def test_sigterm_after_jax_distributed_initialize_stops_before_the_first_step(
    synthetic_arrayrecord, tmp_path, reap):
  """jax.distributed (here one process of its own) replaces the SIGTERM
  handler; the trainer takes it back (before, SIGTERM killed it: 143)."""
  proc = _trainer(synthetic_arrayrecord, tmp_path / "wd",
                  f"--coordinator_address=127.0.0.1:{_free_port()}",
                  "--num_processes=1", "--process_id=0")
  reap(proc)
  _wait_for_line(proc, "process 0/1")  # Logged after jax.distributed.
  proc.send_signal(signal.SIGTERM)
  _assert_stopped_before_the_first_step(proc, tmp_path / "wd")


def test_sigterm_to_one_of_two_processes_during_start_up_stops_both(
    synthetic_arrayrecord, tmp_path, reap):
  """The processes agree: both stop before the first step, both exit 75."""
  port = _free_port()
  procs = [_trainer(synthetic_arrayrecord, tmp_path / "wd",
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}")
           for i in range(2)]
  for p in procs:
    reap(p)
  _wait_for_line(procs[1], "process 1/2")
  procs[1].send_signal(signal.SIGTERM)
  # Process 0 prints the line for the job, naming the signalled process.
  _assert_stopped_before_the_first_step(procs[0], tmp_path / "wd",
                                        by="SIGTERM on process 1")
  _assert_stopped_before_the_first_step(procs[1], tmp_path / "wd",
                                        printed=False)


# A loop of short "steps" that stops when asked, as the trainer's loop does.
_STEPPING_MAIN = """
import sys, time
from affectjax import preemption
with preemption.StopRequest(abort_after_s=600) as stop:
  print("ready", flush=True)
  step = 0
  while True:
    time.sleep(float(sys.argv[1]))
    step += 1
    if stop.should_stop(step):
      print("stopped after step", step, flush=True)
      sys.exit(75)
"""


def _no_slurm_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return {**env, "PYTHONPATH": REPO, **extra}


def _start_stepping(tmp_path, reap, step_s, env):
  proc = subprocess.Popen(
      [sys.executable, _script(_STEPPING_MAIN, tmp_path), str(step_s)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  reap(proc)
  assert proc.stdout.readline() == "ready\n", proc.communicate()[1][-2000:]
  return proc


def test_under_slurm_a_later_sigterm_still_saves(tmp_path, reap):
  """Under SLURM the batch script may pass on a request SLURM also sent to
  the tasks, seconds later (examples/slurm/train.sbatch on a SIGTERM to its
  shell): still one stop request, never an abort; SLURM's own SIGKILL bounds
  a run that does not stop. A second SIGINT still aborts."""
  env = _no_slurm_env(SLURM_JOB_ID="4242")
  proc = _start_stepping(tmp_path, reap, 5.0, env)  # Signalled mid-step.
  proc.send_signal(signal.SIGTERM)
  time.sleep(signal_rules.SCHEDULER_REPEAT_S + 1.0)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err[-2000:]
  assert "stopped after step 1" in out, out
  assert "scancel --signal=KILL" in err, err[-2000:]  # How to abort there.

  proc = _start_stepping(tmp_path, reap, 30.0, env)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGINT, err[-2000:]


def test_slurms_repeated_sigterm_still_saves_a_later_one_aborts(tmp_path, reap):
  """At a time limit or a preemption without grace time SLURM sends SIGTERM,
  SIGCONT, SIGTERM within milliseconds: one stop request, not an abort. A
  SIGTERM after SCHEDULER_REPEAT_S is a second request and aborts."""
  def start(step_s):
    return _start_stepping(tmp_path, reap, step_s, _no_slurm_env())

  proc = start(step_s=1.0)
  for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGTERM):
    proc.send_signal(s)
    time.sleep(0.005)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err[-2000:]
  assert "stopped after step" in out

  proc = start(step_s=30.0)  # Still in its first step when signalled again.
  proc.send_signal(signal.SIGTERM)
  time.sleep(signal_rules.SCHEDULER_REPEAT_S + 1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "second signal (SIGTERM) while stopping" in err
