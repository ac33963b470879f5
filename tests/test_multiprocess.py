"""Real multi-process runs: jax.distributed on 127.0.0.1, gloo CPU collectives.

Each process is a real subprocess with its own fake CPU devices; they find
each other through JAX's coordination service, as hosts of a cluster do.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_KEYS = ("loss", "accuracy", "macro_f1", "valence_ccc", "arousal_ccc",
            "valence_rmse", "arousal_rmse")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


@pytest.fixture
def procs():
  """Started subprocesses; any still running at teardown are killed."""
  started = []
  yield started
  for p in started:
    if p.poll() is None:
      p.kill()
      p.wait()


def _spawn(procs, args, *, devices, process_id=None, port=None, num=2):
  extra = [] if port is None else [
      f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num}",
      f"--process_id={process_id}"]
  p = subprocess.Popen([sys.executable, *args, *extra], cwd=REPO,
                       env=_env(devices), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  procs.append(p)
  return p


# A loop without training: each process steps at its own pace, so only the
# sync protocol can make them stop after the same step.
_STEPPER = """
import sys, time
from absl import flags
from affectjax import distributed, preemption
a = dict(x.lstrip("-").split("=", 1) for x in sys.argv[1:])
pid = int(a["process_id"])
distributed.initialize(coordinator_address=a["coordinator_address"],
                       num_processes=int(a["num_processes"]), process_id=pid)
with preemption.StopRequest(abort_after_s=60) as stop:
  step = 0
  while step < 100_000:
    time.sleep(0.01 * (1 + pid))
    step += 1
    if step == 20:
      print("ready", flush=True)
    if stop.should_stop(step):
      break
print(f"stopped after {step} by {stop.signal_name}", flush=True)
"""


def test_sigterm_to_one_process_stops_all_after_the_same_step(procs, tmp_path):
  script = tmp_path / "stepper.py"
  script.write_text(textwrap.dedent(_STEPPER))
  port = _free_port()
  ps = [_spawn(procs, [str(script)], devices=1, process_id=i, port=port)
        for i in range(2)]
  for p in ps:
    assert p.stdout.readline() == "ready\n", p.communicate()[1][-3000:]
  ps[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=60) for p in ps]
  for p, (_, err) in zip(ps, outs):
    assert p.returncode == 0, err[-3000:]
  lines = [out.strip().splitlines()[-1] for out, _ in outs]
  steps = {int(l.split()[2]) for l in lines}
  assert len(steps) == 1, lines  # The same step on both.
  assert lines[1].endswith("by SIGTERM"), lines
  assert lines[0].endswith("by SIGTERM on process 1"), lines


def test_processes_with_different_device_counts_fail_clearly(procs, tmp_path):
  script = tmp_path / "check.py"
  script.write_text(textwrap.dedent("""
      import sys
      from affectjax import distributed
      a = dict(x.lstrip("-").split("=", 1) for x in sys.argv[1:])
      distributed.initialize(coordinator_address=a["coordinator_address"],
                             num_processes=2, process_id=int(a["process_id"]))
      distributed.check_devices()
      """))
  port = _free_port()
  ps = [_spawn(procs, [str(script)], devices=1 + i, process_id=i, port=port)
        for i in range(2)]
  for p in ps:
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert ("Processes see different numbers of devices (process 0: 1, "
            "process 1: 2") in err, err[-3000:]


# --------------------------------------------------------------------------
# Training (affectjax.main) with several processes.
# --------------------------------------------------------------------------
def _train_args(data_dir, workdir, *overrides):
  return ["-m", "affectjax.main", "--config=configs/custom_cnn.py:tiny",
          f"--config.data.dir={data_dir}", f"--workdir={workdir}",
          "--config.compilation_cache_dir=", *overrides]


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _wait(ps, timeout):
  outs = [p.communicate(timeout=timeout) for p in ps]
  for p, (_, err) in zip(ps, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_equal_one_process(procs, synthetic_arrayrecord,
                                         tmp_path):
  """2 processes x 2 devices train exactly as 1 process x 4 devices."""
  overrides = ("--config.total_steps=4", "--config.eval_every_steps=4",
               "--config.checkpoint_every_steps=4")
  one = tmp_path / "one"
  ps = [_spawn(procs, _train_args(synthetic_arrayrecord, one, *overrides),
               devices=4)]
  two = tmp_path / "two"
  port = _free_port()
  ps += [_spawn(procs, _train_args(synthetic_arrayrecord, two, *overrides),
                devices=2, process_id=i, port=port) for i in range(2)]
  outs = _wait(ps, timeout=400)
  assert "Expression accuracy" in outs[1][0]  # Only process 0 prints.
  assert "Expression accuracy" not in outs[2][0]
  a, b = _lines(one), _lines(two)
  assert [(l["split"], l["step"]) for l in a] == [
      (l["split"], l["step"]) for l in b]
  for x, y in zip(a, b):
    for k in ("loss", "grad_norm") + VAL_KEYS:
      if k in x:
        np.testing.assert_allclose(y[k], x[k], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{k} at {x['split']} {x['step']}")
  val = [l for l in b if l["split"] == "val"]
  assert val[-1]["step"] == 4 and val[-1]["num_examples"] == 52


@pytest.mark.slow
def test_sigterm_to_one_training_process_stops_both_cleanly(
    procs, synthetic_arrayrecord, tmp_path):
  port = _free_port()
  ps = [_spawn(procs, _train_args(
      synthetic_arrayrecord, tmp_path, "--config.total_steps=100000",
      "--config.eval_every_steps=100000", "--config.log_every_steps=1"),
               devices=2, process_id=i, port=port) for i in range(2)]
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert time.monotonic() < deadline and all(p.poll() is None for p in ps), (
        [p.communicate()[1][-2000:] for p in ps])
    time.sleep(0.2)
  ps[1].send_signal(signal.SIGTERM)
  outs = _wait(ps, timeout=120)
  line = outs[0][0].strip().splitlines()[-1]
  assert line.startswith("Stopped by SIGTERM on process 1 at step "), line
  assert line.endswith("after saving a checkpoint; rerun the same command "
                       "to resume."), line
  step = int(line.split(" at step ")[1].split()[0])
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == str(step) or (
      str(step) in os.listdir(tmp_path / "checkpoints"))
