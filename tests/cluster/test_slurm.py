"""examples/slurm/train.sbatch on a real SLURM: the time-limit warning, then a
preemption; each time a save, exit 75 and a requeue; in the end the same
model as an uninterrupted run. And a user's `scancel JOBID`: a save, and the
job stays cancelled. A SIGTERM to the batch shell (`scancel --batch`): a
save and a requeue. And `--ntasks=2` without --distributed: both tasks exit
2 at start naming the flag.

Not part of the main suite (setup.cfg ignores tests/cluster; .ci/run runs it
as a stage of its own): tests/cluster/slurm_up.sh installs Debian's
slurm-wlm and munge when missing and starts munged, slurmctld and slurmd for
a one-node cluster on this host (partition `batch`: PreemptMode=REQUEUE with
GraceTime; partition `urgent`: preempts it). Where SLURM cannot be started
this skips, except under CI (CI or AFFECTJAX_REQUIRE_SLURM set), where it
fails.

The job is submitted as users submit it (`sbatch --ntasks=2 --time=...
examples/slurm/train.sbatch --distributed ...`): two tasks, one CPU device
each, that find each other through JAX's SLURM detection and train over gloo.
Both signals come from SLURM itself:
  the warning: the file's own `#SBATCH --signal=TERM@120`. The test shortens
    the job's time limit so that slurmctld's periodic check (every 30 s)
    finds the job within 120 s of its end and signals it;
  the preemption: a job submitted to `urgent` that needs the whole node, so
    that slurmctld preempts this one (SIGCONT + SIGTERM to its tasks now,
    SIGKILL after the grace time, requeue).
A tiny run is faster than SLURM's 30-second timer, so while the test waits
for SLURM it holds the training tasks with SIGSTOP (the signal stays pending,
as in a slow step) and releases them with SIGCONT once SLURM has signalled
them; no signal is sent by the test itself.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import use_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")
SLURM_UP = os.path.join(REPO, "tests", "cluster", "slurm_up.sh")
TOTAL = 120
PREEMPTED = 75
REQUIRED = bool(os.environ.get("CI") or os.environ.get("AFFECTJAX_REQUIRE_SLURM"))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  """A running one-node SLURM; yields the environment to reach it."""
  root = tmp_path_factory.mktemp("slurm")
  up = subprocess.run([SLURM_UP, "up", str(root)], capture_output=True,
                      text=True, timeout=900)
  if up.returncode != 0:
    subprocess.run([SLURM_UP, "down", str(root)], capture_output=True,
                   timeout=120)
    message = (f"could not start SLURM ({SLURM_UP} up: exit {up.returncode}):"
               f"\n{up.stderr[-3000:]}")
    if REQUIRED:
      pytest.fail(message)
    pytest.skip(message)
  env = dict(os.environ)
  env["SLURM_CONF"] = str(root / "slurm.conf")
  try:
    yield env
  finally:
    subprocess.run([SLURM_UP, "down", str(root)], capture_output=True,
                   timeout=300)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """One compilation cache for the module's jobs (they compile the same steps)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(args, env, *, timeout=120, check=True, **kwargs):
  p = subprocess.run(args, env=env, capture_output=True, text=True,
                     timeout=timeout, **kwargs)
  assert p.returncode == 0 or not check, (
      f"{args}: exit {p.returncode}: {p.stderr}")
  return p.stdout


def _job_env(env):
  """What a user's shell would hold: the checkout's Python, CPU jax."""
  env = dict(env)
  env.update(PYTHON=sys.executable, AFFECTJAX_ACCELERATOR="cpu",
             JAX_PLATFORMS="cpu",
             # One CPU device per task, as one GPU per task.
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0")
  env.pop("PYTHONPATH", None)
  return env


def _trainer_flags(data_dir, workdir, cache_dir):
  return ["--distributed", "--config=configs/custom_cnn.py:tiny",
          f"--config.data.dir={data_dir}", f"--workdir={workdir}",
          f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
          f"--config.eval_every_steps={TOTAL // 2}",
          f"--config.checkpoint_every_steps={TOTAL // 2}",
          f"--config.compilation_cache_dir={cache_dir}"]


def _sbatch(env, out, flags, *extra, check=True):
  """Submits the example as users do, from the checkout; returns the job id.

  With --wait among ``extra``, returns once the job ended (and succeeded,
  unless ``check`` is False).
  """
  return _run(["sbatch", "--parsable", "--ntasks=2", "--time=60",
               f"--output={out}", *extra, SBATCH, *flags],
              env, cwd=REPO, timeout=900, check=check).strip().split(";")[0]


def _job(env, job_id) -> dict:
  text = _run(["scontrol", "show", "job", "-o", job_id], env)
  fields = {}
  for key in ("JobState", "Restarts", "RunTime", "ExitCode", "TimeLimit"):
    m = re.search(rf"\b{key}=(\S+)", text)
    fields[key] = m.group(1) if m else None
  return fields


def _seconds(duration: str) -> int:
  """SLURM's [days-]hours:minutes:seconds."""
  days, _, hms = duration.rpartition("-")
  parts = [int(p) for p in hms.split(":")]
  while len(parts) < 3:
    parts.insert(0, 0)
  h, m, s = parts
  return ((int(days) if days else 0) * 24 + h) * 3600 + m * 60 + s


def _train_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l)["step"] for l in f
            if l.endswith("\n") and json.loads(l)["split"] == "train"]


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
         "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _wait(what, predicate, timeout, diagnose, *, ended=None):
  """Polls ``predicate`` until true; fails on timeout or once ``ended()``."""
  deadline = time.monotonic() + timeout
  next_check = 0.0
  while True:
    value = predicate()
    if value:
      return value
    if ended is not None and time.monotonic() > next_check:
      next_check = time.monotonic() + 1  # scontrol: once a second.
      if ended():
        pytest.fail(f"the job ended while waiting for {what}\n{diagnose()}")
    if time.monotonic() > deadline:
      pytest.fail(f"timed out after {timeout} s waiting for {what}\n"
                  f"{diagnose()}")
    time.sleep(0.05)


def _task_pids(env, job_id) -> list[int]:
  """The processes of the job's steps on this node, the batch shell's excepted."""
  out = subprocess.run(["scontrol", "listpids", job_id], env=env,
                       capture_output=True, text=True, timeout=60).stdout
  pids = []
  for line in out.splitlines()[1:]:
    cols = line.split()
    if len(cols) >= 3 and cols[2] not in ("batch", "extern"):
      pids.append(int(cols[0]))
  return pids


def _proc_status(pid) -> dict:
  try:
    with open(f"/proc/{pid}/status") as f:
      return dict(l.rstrip("\n").split(":\t", 1) for l in f if ":\t" in l)
  except OSError:
    return {}


def _term_pending_or_running(pid) -> bool:
  """SIGTERM is pending on the stopped process, or SLURM's SIGCONT woke it."""
  s = _proc_status(pid)
  if not s:
    return True  # Gone.
  pending = int(s["ShdPnd"], 16) | int(s["SigPnd"], 16)
  return bool(pending & (1 << (signal.SIGTERM - 1))) or not s["State"].startswith("T")


def _hold(pids):
  """SIGSTOP, and wait until every one is stopped."""
  for p in pids:
    os.kill(p, signal.SIGSTOP)
  deadline = time.monotonic() + 30
  while not all(_proc_status(p).get("State", "T").startswith("T")
                for p in pids):
    assert time.monotonic() < deadline, "tasks did not stop on SIGSTOP"
    time.sleep(0.01)


def _release(pids):
  for p in pids:
    try:
      os.kill(p, signal.SIGCONT)
    except ProcessLookupError:
      pass


def test_warning_and_preemption_requeue_and_finish_as_uninterrupted(
    slurm, synthetic_arrayrecord, jax_cache, tmp_path):
  cache = jax_cache
  env = _job_env(slurm)

  # The uninterrupted run: the same script, tasks and flags.
  ref_wd = str(tmp_path / "reference")
  ref_out = str(tmp_path / "reference.out")
  ref_id = _sbatch(env, ref_out,
                   _trainer_flags(synthetic_arrayrecord, ref_wd, cache),
                   "--wait")
  assert _job(env, ref_id)["JobState"] == "COMPLETED", open(ref_out).read()[-5000:]

  workdir = str(tmp_path / "run")
  out = str(tmp_path / "run.out")
  job = _sbatch(env, out, _trainer_flags(synthetic_arrayrecord, workdir, cache))

  def log():
    text = open(out).read() if os.path.exists(out) else "(no output yet)"
    return f"job {job}: {_job(env, job)}\n{text[-8000:]}"

  def ended() -> bool:
    return _job(env, job)["JobState"] in ENDED

  def stopped_at() -> list[int]:
    text = open(out).read() if os.path.exists(out) else ""
    # Process 0's resume message, once per stop.
    return [int(s) for s in re.findall(
        r"^Stopped by SIGTERM at step (\d+) after saving a checkpoint", text,
        re.MULTILINE)]

  # 1. The time-limit warning, from the file's own --signal=TERM@120: once
  # the first start trains, hold its tasks and bring the time limit within
  # 90-150 s; slurmctld signals the steps at its next check (<= 30 s).
  _wait("the first start to train", lambda: len(_train_steps(workdir)) >= 3,
        600, log, ended=ended)
  pids = _task_pids(env, job)
  assert len(pids) >= 2, pids
  _hold(pids)
  try:
    elapsed = _seconds(_job(env, job)["RunTime"])
    _run(["scontrol", "update", f"JobId={job}",
          f"TimeLimit={(elapsed + 150) // 60}"], env)
    _wait("SLURM's time-limit warning (SIGTERM) to the tasks",
          lambda: all(_term_pending_or_running(p) for p in pids), 120, log,
          ended=ended)
    # Back to a long limit, so that later starts get no warning.
    _run(["scontrol", "update", f"JobId={job}", "TimeLimit=60"], env)
  finally:
    _release(pids)
  _wait("the warned start to stop", lambda: len(stopped_at()) == 1, 300, log,
        ended=ended)
  first_stop = stopped_at()[0]

  # 2. Preemption: an `urgent` job that needs the whole node.
  _wait("the second start to train past the first stop",
        lambda: max(_train_steps(workdir) or [0]) >= first_stop + 3 and
        "start 2," in open(out).read(), 600, log, ended=ended)
  pids = _task_pids(env, job)
  assert len(pids) >= 2, pids
  _hold(pids)
  try:
    urgent = _run(["sbatch", "--parsable", "--partition=urgent", "--exclusive",
                   f"--output={tmp_path / 'urgent.out'}", "--wrap",
                   "echo urgent job ran"], env).strip()
    _wait("the preemption's SIGTERM to the tasks",
          lambda: all(_term_pending_or_running(p) for p in pids), 120, log,
          ended=ended)
  finally:
    _release(pids)

  # 3. The third start finishes.
  _wait("the job to end", ended, 900, log)
  info = _job(env, job)
  text = open(out).read()
  assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log()
  assert info["Restarts"] == "2", log()  # Requeued once per signal.
  assert _job(env, urgent)["JobState"] == "COMPLETED"
  assert "urgent job ran" in open(tmp_path / "urgent.out").read()
  stops = stopped_at()
  assert len(stops) == 2 and first_stop < stops[1] < TOTAL, log()
  assert text.count("stopped after a checkpoint (exit 75): requeueing") == 2, log()
  assert [f"start {i}," in text for i in (1, 2, 3)] == [True] * 3, log()
  assert "start 4," not in text and "training finished" in text, log()
  assert "Expression accuracy" in text  # The summary of the finished run.

  # Every step logged once, the same lines as the uninterrupted run's.
  assert _train_steps(workdir) == list(range(1, TOTAL + 1))
  keys = [(l["split"], l["step"]) for l in map(json.loads, open(
      os.path.join(workdir, "metrics.jsonl")))]
  ref_keys = [(l["split"], l["step"]) for l in map(json.loads, open(
      os.path.join(ref_wd, "metrics.jsonl")))]
  assert keys == ref_keys
  # And the same model.
  step, params = use_fixtures.final_params(workdir)
  ref_step, ref_params = use_fixtures.final_params(ref_wd)
  assert step == ref_step == TOTAL
  for x, y in zip(params, ref_params, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_scancel_saves_and_stays_cancelled(slurm, synthetic_arrayrecord,
                                           jax_cache, tmp_path):
  """A user's `scancel JOBID` (SIGCONT, SIGTERM, SIGKILL after KillWait):
  the tasks save and exit 75 as for a warning, but the job stays cancelled."""
  env = _job_env(slurm)
  workdir = str(tmp_path / "run")
  out = str(tmp_path / "run.out")
  flags = _trainer_flags(synthetic_arrayrecord, workdir, jax_cache)
  flags = [f for f in flags if not f.startswith("--config.total_steps=")]
  job = _sbatch(env, out, [*flags, "--config.total_steps=1000000"])

  def log():
    text = open(out).read() if os.path.exists(out) else "(no output yet)"
    return f"job {job}: {_job(env, job)}\n{text[-8000:]}"

  def ended() -> bool:
    return _job(env, job)["JobState"] in ENDED

  _wait("the job to train", lambda: len(_train_steps(workdir)) >= 3, 600, log,
        ended=ended)
  _run(["scancel", job], env)
  _wait("the job to end", ended, 300, log)
  info = _job(env, job)
  text = open(out).read()
  assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log()
  assert re.search(r"^Stopped by SIGTERM at step \d+ after saving a "
                   "checkpoint", text, re.MULTILINE), log()
  assert "not requeued by this script" in text, log()
  assert "start 2," not in text
  time.sleep(15)  # Longer than the requeue delay: still cancelled.
  assert _job(env, job)["JobState"] == "CANCELLED", log()


def test_several_tasks_without_distributed_exit_2_at_once(
    slurm, synthetic_arrayrecord, jax_cache, tmp_path):
  """The slip everyone makes once: `sbatch --ntasks=2` without --distributed.
  Each task would train on its own in one workdir (racing saves, steps
  logged twice); both refuse at start, exit 2 naming --distributed, and the
  job fails without a requeue."""
  env = _job_env(slurm)
  workdir = str(tmp_path / "run")
  out = str(tmp_path / "run.out")
  flags = [f for f in _trainer_flags(synthetic_arrayrecord, workdir, jax_cache)
           if f != "--distributed"]
  t0 = time.monotonic()
  job = _sbatch(env, out, flags, "--wait", check=False)
  seconds = time.monotonic() - t0
  info = _job(env, job)
  text = open(out).read()
  assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text
  assert info["Restarts"] == "0", text
  refusals = re.findall(
      r"^affectjax\.main: this process is one of 2 tasks a launcher started "
      r"\(SLURM_STEP_NUM_TASKS=2\), but --distributed is not given", text,
      re.MULTILINE)
  assert len(refusals) == 2, text  # One line per task.
  assert "srun exited 2: this script does not requeue" in text, text
  assert not os.path.exists(workdir), os.listdir(workdir)
  assert seconds < 120, seconds  # At start: no model built, nothing trained.


def test_sigterm_to_the_batch_shell_saves_and_requeues(
    slurm, synthetic_arrayrecord, jax_cache, tmp_path):
  """`scancel --batch --signal=TERM`: the script passes it on to the tasks,
  which save and exit 75 (however late SLURM's and the script's SIGTERMs
  reach them); the job is requeued and finishes, every step logged once."""
  env = _job_env(slurm)
  workdir = str(tmp_path / "run")
  out = str(tmp_path / "run.out")
  job = _sbatch(env, out, _trainer_flags(synthetic_arrayrecord, workdir,
                                         jax_cache))

  def log():
    text = open(out).read() if os.path.exists(out) else "(no output yet)"
    return f"job {job}: {_job(env, job)}\n{text[-8000:]}"

  def ended() -> bool:
    return _job(env, job)["JobState"] in ENDED

  _wait("the job to train", lambda: len(_train_steps(workdir)) >= 3, 600, log,
        ended=ended)
  pids = _task_pids(env, job)
  assert len(pids) >= 2, pids
  _hold(pids)
  try:
    _run(["scancel", "--batch", "--signal=TERM", job], env)
    _wait("the batch shell's SIGTERM passed on to the tasks",
          lambda: all(_term_pending_or_running(p) for p in pids), 120, log,
          ended=ended)
    # A person repeating it, seconds later: not passed on again.
    _run(["scancel", "--batch", "--signal=TERM", job], env)
    time.sleep(3)
  finally:
    _release(pids)
  _wait("the job to end", ended, 900, log)
  info = _job(env, job)
  text = open(out).read()
  assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log()
  assert text.count("passing it on to the training tasks") == 1, log()
  assert re.search(r"^Stopped by SIGTERM at step \d+ after saving a "
                   "checkpoint", text, re.MULTILINE), log()
  assert text.count("stopped after a checkpoint (exit 75): requeueing") == 1
  assert "aborting without saving" not in text, log()
  assert _train_steps(workdir) == list(range(1, TOTAL + 1))
