"""Synthetic AffectNet -> ArrayRecords -> train -> eval -> checkpoint -> resume.

Also the run as users start it: real subprocesses of ``affectjax.main`` (and
``launch.sh``) stopped by SIGTERM, killed with SIGKILL at random moments and
rerun, which must end exactly where an uninterrupted run does.
"""
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import sharding, train, train_state
from configs import custom_cnn
from tests import use_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_KEYS = ("loss", "accuracy", "macro_f1", "valence_ccc", "arousal_ccc",
            "valence_rmse", "arousal_rmse")


def _config(data_dir, total_steps):
  c = custom_cnn.get_config("tiny")
  c.data.dir = data_dir
  c.total_steps = total_steps
  return c


def _final_state(config, workdir):
  mesh = sharding.make_mesh()
  _, state, _ = train_state.init_state(config, mesh)
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                            every_steps=1, keep=1)
  restored = c.restore(c.latest_step(), ckpt_lib.abstract_like(state))
  c.close()
  return jax.device_get(restored)


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_train_evaluate_checkpoint_and_resume_equals_uninterrupted(
    synthetic_arrayrecord, tmp_path):
  workdir = str(tmp_path)
  config = _config(synthetic_arrayrecord, 8)
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 8
  lines = _lines(workdir)
  train_lines = [l for l in lines if l["split"] == "train"]
  val_lines = [l for l in lines if l["split"] == "val"]
  assert [l["step"] for l in train_lines] == [2, 4, 6, 8]
  assert all(np.isfinite(l["loss"]) for l in train_lines)
  assert [l["step"] for l in val_lines] == [3, 6, 8]
  for l in val_lines:
    for k in VAL_KEYS:
      assert isinstance(l[k], float), (k, l)
    assert l["num_examples"] == 52
    assert sum(map(sum, l["confusion_matrix"])) == 52
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted((d for d in os.listdir(ckpt_dir) if d.isdigit()), key=int) == ["3", "6", "8"]
  uninterrupted = _final_state(config, workdir)

  # A run killed after its step-3 checkpoint leaves just that one on disk.
  for step in ("6", "8"):
    shutil.rmtree(os.path.join(ckpt_dir, step))
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 8
  after = [l for l in _lines(workdir) if l["split"] == "train"]
  # Each step once: the lines of steps 4-8 the killed run wrote are replaced
  # by the replayed ones; step 2's (before the checkpoint) is kept as it was
  # (its timing would differ had the run started over from 0).
  assert [l["step"] for l in after] == [2, 4, 6, 8]
  assert after[0] == train_lines[0]
  assert after[1]["steps_per_sec"] != train_lines[1]["steps_per_sec"]
  assert [l["step"] for l in _lines(workdir) if l["split"] == "val"] == [3, 6, 8]
  resumed = _final_state(config, workdir)
  assert int(resumed["step"]) == 8
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                               atol=1e-6)

  # Rerunning a finished run only evaluates, and does not duplicate lines.
  n_before = len(_lines(workdir))
  again = train.train_and_evaluate(config, workdir)
  assert again["step"] == 8 and len(_lines(workdir)) == n_before


def _env(devices):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


@pytest.mark.slow
def test_command_line_overrides_and_summary(synthetic_arrayrecord,
                                            compile_cache, reference_run,
                                            tmp_path):
  # The reference run's configuration, so its compiled steps are reused.
  out = subprocess.run(
      [sys.executable, "-m", "affectjax.main",
       *_main_args(synthetic_arrayrecord, tmp_path, compile_cache)],
      cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Expression accuracy" in out.stdout and "Valence CCC" in out.stdout
  written = json.load(open(tmp_path / "config.json"))
  assert (written["total_steps"], written["eval_every_steps"]) == (TOTAL, 4)
  # The summary says which step each column is: the last, and the best.
  best = json.load(open(tmp_path / "checkpoints" / "best.json"))
  assert f"Validation at step {TOTAL} (52 examples), the last step" in out.stdout
  assert (f"Best checkpoint: step {best['step']}, macro_f1 "
          f"{best['value']:.4f} on val") in out.stdout
  if best["step"] != TOTAL:
    assert f"best, step {best['step']}" in out.stdout

  # A misspelt config field: a bad flag (exit 2: fix the command), in one
  # line with ml_collections' suggestion, not a traceback (exit 1).
  bad = subprocess.run(
      [sys.executable, "-m", "affectjax.main",
       "--config=configs/custom_cnn.py:tiny", "--config.batch_sizes=3",
       f"--workdir={tmp_path}"],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert ("FATAL Flags parsing error: a --config override names a field the "
          "config does not have: 'batch_sizes' Did you mean \"batch_size\""
          in bad.stderr), bad.stderr[-3000:]
  assert "Traceback" not in bad.stderr

  # A misspelt best_metric: one line naming the valid ones, before training.
  typo = subprocess.run(
      [sys.executable, "-m", "affectjax.main",
       *_main_args(synthetic_arrayrecord, tmp_path / "typo", compile_cache),
       "--config.checkpoint.best_metric=accuracyy"],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
  assert typo.returncode == 2, typo.stderr[-3000:]
  assert ("best_metric='accuracyy' is not an evaluation metric (did you mean "
          "'accuracy'?); choose one of loss, accuracy, macro_f1") in typo.stderr
  assert "Traceback" not in typo.stderr
  assert not (tmp_path / "typo").exists()


def test_missing_data_dir_names_the_flag(tmp_path):
  c = _config(str(tmp_path / "nowhere"), 2)
  with pytest.raises(FileNotFoundError, match="config.data.dir=.*nowhere"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))


# --------------------------------------------------------------------------
# Subprocess runs: SIGTERM, SIGKILL, rerun. They share one configuration (so
# one compiled step, through a test-local persistent compilation cache) and
# one uninterrupted reference run.
# --------------------------------------------------------------------------
TOTAL = 8
PREEMPTED = 75  # The exit status of a run stopped by a signal after its save.


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _main_args(data_dir, workdir, compile_cache):
  return ["--config=configs/custom_cnn.py:tiny", f"--config.data.dir={data_dir}",
          f"--workdir={workdir}", f"--config.total_steps={TOTAL}",
          "--config.log_every_steps=1", "--config.eval_every_steps=4",
          "--config.checkpoint_every_steps=4",
          f"--config.compilation_cache_dir={compile_cache}"]


# Runs affectjax.main and reports, at exit, whether the process ever imported
# tensorflow_datasets: its first import swapped builtins.__import__ under
# Orbax's save threads (issue 7 item 2), so the trainer must never import it.
_MAIN_WITH_IMPORT_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('tensorflow_datasets imported:', "
    "'tensorflow_datasets' in sys.modules, flush=True))\n"
    "from affectjax import main\n"
    "sys.argv[0] = 'affectjax.main'\n"
    "main.run()\n")


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
  """A failing test leaves no training process running."""
  yield
  while _STARTED:
    p = _STARTED.pop()
    if p.poll() is None:
      p.kill()
      p.communicate()


def _start(args, *, via_launch_sh=False, devices=4):
  if via_launch_sh:
    cmd = [os.path.join(REPO, "launch.sh"), "train", *args]
    env = {**_env(devices), "PYTHON": sys.executable,
           "AFFECTJAX_ACCELERATOR": "cpu"}
  else:
    cmd = [sys.executable, "-c", _MAIN_WITH_IMPORT_PROBE, *args]
    env = _env(devices)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  _STARTED.append(proc)
  return proc


def _finish(proc, timeout=300):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"run did not finish in {timeout} s: {err[-3000:]}")
  return out, err


def _finish_all(procs, timeout=300):
  """``_finish`` for several processes at once, reading every pipe.

  Waiting on one process while another's pipes go unread deadlocks a
  multi-process run: a pipe holds 64 KiB, the blocked process stops at its
  next collective, and so do the others (seen with the 2-step log lines of a
  time-budget test).
  """
  with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
    return list(pool.map(lambda p: _finish(p, timeout), procs))


def _metrics_lines(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.endswith("\n")]


def _wait_for_train_step(proc, workdir, min_step, timeout=300):
  deadline = time.monotonic() + timeout
  while True:
    steps = [l["step"] for l in _metrics_lines(workdir) if l["split"] == "train"]
    if steps and max(steps) >= min_step:
      return max(steps)
    if proc.poll() is not None or time.monotonic() > deadline:
      out, err = _finish(proc, 1)
      pytest.fail(f"no train line for step {min_step} (exit {proc.returncode})"
                  f": {err[-3000:]}")
    time.sleep(0.02)


def _assert_same_run(workdir, reference, tol=1e-6):
  """Same final checkpoint and same metrics lines as the uninterrupted run."""
  step, params = use_fixtures.final_params(workdir)
  ref_step, ref_params = use_fixtures.final_params(reference)
  assert step == ref_step == TOTAL
  for x, y in zip(params, ref_params, strict=True):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
  lines, ref = _metrics_lines(workdir), _metrics_lines(reference)
  keys = [(l["split"], l["step"]) for l in lines]
  assert len(keys) == len(set(keys)), f"duplicate lines: {keys}"
  assert keys == [(l["split"], l["step"]) for l in ref]
  for l, r in zip(lines, ref):
    for k in ("loss", "accuracy") + VAL_KEYS:
      if isinstance(r.get(k), float):
        np.testing.assert_allclose(l[k], r[k], rtol=max(tol, 1e-5), atol=tol,
                                   err_msg=f"{k} at {r['split']} {r['step']}")


@pytest.fixture(scope="module")
def reference_run(synthetic_arrayrecord, compile_cache, tmp_path_factory):
  """One uninterrupted run whose evaluations and checkpoint saves coincide."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = _start(_main_args(synthetic_arrayrecord, workdir, compile_cache))
  out, err = _finish(proc)
  assert proc.returncode == 0, err[-3000:]
  return workdir, out


@pytest.mark.slow
def test_eval_coinciding_with_async_save_finishes_without_tfds(reference_run):
  """Regression for issue 7 item 2 (Orbax save threads vs tfds' lazy import)."""
  workdir, out = reference_run
  assert "tensorflow_datasets imported: False" in out, out[-2000:]
  assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
             if d.isdigit()) == TOTAL
  val_steps = [l["step"] for l in _metrics_lines(workdir) if l["split"] == "val"]
  assert val_steps == [4, 8]


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes_exactly(synthetic_arrayrecord,
                                                 compile_cache, reference_run,
                                                 tmp_path):
  """Through launch.sh, as a scheduler's job script runs it: the trainer's
  exit status (75, EX_TEMPFAIL: requeue me) must reach the scheduler."""
  workdir = str(tmp_path)
  args = _main_args(synthetic_arrayrecord, workdir, compile_cache)
  proc = _start(args, via_launch_sh=True)
  _wait_for_train_step(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = _finish(proc)
  assert proc.returncode == PREEMPTED, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("Stopped by")]
  assert len(line) == 1, out[-2000:]
  assert line[0].startswith("Stopped by SIGTERM at step ")
  assert line[0].endswith(" after saving a checkpoint; rerun the same command "
                          "to resume (exit status 75).")
  stopped = int(line[0].split(" at step ")[1].split()[0])
  assert 2 <= stopped < TOTAL
  assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))
  assert "Expression accuracy" not in out  # No summary table when stopped.

  proc = _start(args)
  out, err = _finish(proc)
  assert proc.returncode == 0, err[-3000:]
  assert "Expression accuracy" in out
  _assert_same_run(workdir, reference_run[0])


def _descendants(pid: int) -> set[int]:
  """Every live descendant of ``pid``, from /proc."""
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except OSError:
        continue
  found, frontier = set(), {pid}
  while frontier:
    frontier = {p for p, pp in parents.items() if pp in frontier} - found
    found |= frontier
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(
    synthetic_arrayrecord, compile_cache, reference_run, tmp_path):
  """Repeated kill -9 (mid-step, mid-save, mid-eval), then a plain rerun.

  Each kill must land in a running run: the process dies of SIGKILL and its
  last logged step is short of the total (a run that finished before the
  kill would test nothing). The workdir is a file:// URL; the final rerun
  goes through launch.sh, as a user's would.
  """
  workdir = str(tmp_path / "wd")
  args = _main_args(synthetic_arrayrecord, "file://" + workdir, compile_cache)
  rng = random.Random(0)

  def last_train_step():
    return max([l["step"] for l in _metrics_lines(workdir)
                if l["split"] == "train"] or [0])

  for cap in (TOTAL // 2 - 1, TOTAL - 2):
    proc = _start(args)
    _wait_for_train_step(proc, workdir, min(last_train_step() + 1, cap))
    # A random moment, but early enough that the run is still going: a kill
    # after the run finished would test nothing.
    deadline = time.monotonic() + rng.uniform(0, 0.5)
    while time.monotonic() < deadline and last_train_step() < cap:
      time.sleep(0.01)
    children = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # The trainer only, as `kill -9` does.
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert last_train_step() < TOTAL, "the run reached its last step"
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "orphaned processes"
  proc = _start(args, via_launch_sh=True)
  out, err = _finish(proc)
  assert proc.returncode == 0, err[-3000:]
  _assert_same_run(workdir, reference_run[0])


# --------------------------------------------------------------------------
# Several processes (jax.distributed on 127.0.0.1, gloo collectives). Here,
# not in test_multiprocess.py, because they share the reference run and the
# compiled steps of this module.
# --------------------------------------------------------------------------
def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_processes(args, n=2):
  port = _free_port()
  return [_start([*args, f"--coordinator_address=127.0.0.1:{port}",
                  f"--num_processes={n}", f"--process_id={i}"], devices=2)
          for i in range(n)]


@pytest.mark.slow
def test_two_processes_stop_together_and_resume_as_one_process(
    synthetic_arrayrecord, compile_cache, reference_run, tmp_path):
  """SIGTERM to one of 2 processes x 2 devices stops both cleanly (exit 75);
  the rerun ends as 1 process x 4 devices (the reference run) does."""
  args = _main_args(synthetic_arrayrecord, tmp_path, compile_cache)
  procs = _start_processes(args)
  _wait_for_train_step(procs[0], str(tmp_path), 2)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish_all(procs, timeout=120)
  for p, (_, err) in zip(procs, outs):
    # Both, not only the signalled one: a scheduler requeues each task.
    assert p.returncode == PREEMPTED, err[-3000:]
  line = [l for l in outs[0][0].splitlines() if l.startswith("Stopped by")]
  assert len(line) == 1 and line[0].startswith(
      "Stopped by SIGTERM on process 1 at step "), outs[0][0][-2000:]
  assert not [l for l in outs[1][0].splitlines() if l.startswith("Stopped")]
  stopped = int(line[0].split(" at step ")[1].split()[0])
  assert 2 <= stopped < TOTAL
  assert str(stopped) in os.listdir(tmp_path / "checkpoints")

  procs = _start_processes(args)
  outs = _finish_all(procs)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Expression accuracy" in outs[0][0]  # Only process 0 prints.
  assert "Expression accuracy" not in outs[1][0]
  _assert_same_run(str(tmp_path), reference_run[0], tol=1e-4)
  # The data position is stored once for the job, not per process, so any
  # topology can resume it.
  step_dir = tmp_path / "checkpoints" / str(TOTAL)
  assert not (step_dir / "data").exists()
  position = json.loads((step_dir / "position" / "metadata").read_text())
  assert (position["process_count"], position["global_batch_size"]) == (2, 16)


# --------------------------------------------------------------------------
# launch.sh pieces, sourced into bash (the install itself needs the network).
# --------------------------------------------------------------------------
def _bash(script, tmp_path, **env):
  return subprocess.run(
      ["bash", "-c", f"source {REPO}/launch.sh\n{script}"], cwd=tmp_path,
      env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_launch_lock_serializes_installs_and_takes_over_dead_owners(tmp_path):
  log = tmp_path / "log"
  job = (f'LOCK={tmp_path}/lock; acquire_lock; echo start >> {log}; '
         f'sleep 0.3; echo end >> {log}; release_lock')
  jobs = [subprocess.Popen(["bash", "-c", f"source {REPO}/launch.sh\n{job}"],
                           stderr=subprocess.PIPE, text=True)
          for _ in range(3)]
  for j in jobs:
    _, err = j.communicate(timeout=60)
    assert j.returncode == 0, err
  assert log.read_text().split() == ["start", "end"] * 3  # Never interleaved.
  assert not (tmp_path / "lock").exists()

  # A lock left by a dead process on this host, and an old one from another
  # host, are taken over; a fresh one from another host is waited for.
  dead = 2**22 + 12345  # Above Linux's pid_max: no such process.
  for owner in (f"$(hostname) {dead} $(date +%s)",
                "otherhost 1 $(( $(date +%s) - 4000 ))"):
    out = _bash(f'LOCK={tmp_path}/lock; mkdir $LOCK; echo "{owner}" > '
                '$LOCK/owner; acquire_lock; echo got it; release_lock',
                tmp_path)
    assert out.returncode == 0 and "got it" in out.stdout, out.stderr
    assert "taking over a stale lock" in out.stderr
  waiter = subprocess.run(
      ["timeout", "3", "bash", "-c", f"source {REPO}/launch.sh\n"
       f'LOCK={tmp_path}/lock; mkdir $LOCK; echo "otherhost 1 $(date +%s)" '
       '> $LOCK/owner; acquire_lock'], capture_output=True, text=True)
  assert waiter.returncode == 124, waiter.stderr  # Still waiting when stopped.
  assert "waiting for another install to finish" in waiter.stderr


def test_launch_refuses_a_backend_that_does_not_match_the_hardware(tmp_path):
  fake = tmp_path / "python"
  fake.write_text("#!/bin/sh\necho cpu\n")
  fake.chmod(0o755)
  env = {"PY": str(fake), "JAX_PLATFORMS": ""}
  out = _bash("cmd=train; check_backend", tmp_path,
              AFFECTJAX_ACCELERATOR="cuda", **env)
  assert out.returncode == 2
  assert "this host has gpu hardware (cuda) but jax's backend is 'cpu'" in (
      out.stderr)
  assert _bash("cmd=train; check_backend", tmp_path,
               AFFECTJAX_ACCELERATOR="cpu", **env).returncode == 0


def test_launch_needs_no_gnu_only_tools():
  """macOS has no sha256sum, flock, readlink -f, GNU stat/date options."""
  text = open(os.path.join(REPO, "launch.sh")).read()
  code = "\n".join(l.split("#")[0] for l in text.splitlines())
  for tool in ("sha256sum", "flock", "readlink -f", "stat -c", "date -d",
               "mapfile", "declare -A", "${1,,}"):
    assert tool not in code, tool
