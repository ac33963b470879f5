"""Real multi-process runs: jax.distributed on 127.0.0.1, gloo CPU collectives.

Each process is a real subprocess with its own fake CPU devices; they find
each other through JAX's coordination service, as hosts of a cluster do.
Multi-process *training* (2 processes equal 1; SIGTERM to one of two) is in
test_end_to_end.py, where it shares the reference run and compiled steps.
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


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


@pytest.mark.parametrize("signalled", [(1,), (0, 1)], ids=["one", "all"])
def test_sigterm_stops_all_processes_after_the_same_step(procs, tmp_path,
                                                         signalled):
  """SIGTERM to one process, or to every one at once (as SLURM sends it)."""
  script = tmp_path / "stepper.py"
  script.write_text(textwrap.dedent(_STEPPER))
  port = _free_port()
  ps = [_spawn(procs, [str(script)], devices=1, process_id=i, port=port)
        for i in range(2)]
  for p in ps:
    assert p.stdout.readline() == "ready\n", p.communicate()[1][-3000:]
  for i in signalled:
    ps[i].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=60) for p in ps]
  for p, (_, err) in zip(ps, outs):
    assert p.returncode == 0, err[-3000:]
  lines = [out.strip().splitlines()[-1] for out, _ in outs]
  steps = {int(l.split()[2]) for l in lines}
  assert len(steps) == 1, lines  # The same step on both.
  assert lines[1].endswith("by SIGTERM"), lines
  assert lines[0].endswith("by SIGTERM" if 0 in signalled else
                           "by SIGTERM on process 1"), lines


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


# What launchers put in each task's environment (srun -n 2, mpirun -np 2,
# MPICH's hydra, a PMIx launcher, a Cloud TPU pod slice's hosts).
_LAUNCHES = {
    "srun": {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
             "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node1",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "1"},
    "mpirun": {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
               "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
    "pmi": {"PMI_SIZE": "4", "PMI_RANK": "3"},
    "pmix": {"PMIX_RANK": "1", "PMIX_NAMESPACE": "prterun-1"},
    "tpu": {"TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_WORKER_ID": "0"},
}


def _launched(tmp_path, name, *flags):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI", "TPU_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **_LAUNCHES[name])
  return subprocess.Popen(
      [sys.executable, "-m", "affectjax.main", "--config=configs/custom_cnn.py:tiny",
       f"--config.data.dir={tmp_path / 'no_data'}",
       f"--workdir={tmp_path / name}", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def test_several_tasks_without_distributed_are_refused(procs, tmp_path):
  """A launcher started this process as one of several tasks and the user
  forgot --distributed: each would train alone in one workdir. Refused at
  start (exit 2, one line naming --distributed), before the workdir exists;
  --nodistributed says the tasks are independent runs on purpose."""
  started = {name: _launched(tmp_path, name) for name in _LAUNCHES}
  procs.extend(started.values())
  independent = _launched(tmp_path, "srun", "--nodistributed")
  procs.append(independent)
  lines = {}
  for name, p in started.items():
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, (name, err[-3000:])
    lines[name] = [l for l in err.splitlines()
                   if l.startswith("affectjax.main: ")]
    assert len(lines[name]) == 1, (name, err[-3000:])
    assert "--distributed is not given" in lines[name][0], lines[name]
    assert "Traceback" not in err
    assert not (tmp_path / name).exists()
  assert ("one of 2 tasks a launcher started (SLURM_STEP_NUM_TASKS=2)"
          in lines["srun"][0]), lines
  assert "(PMI_SIZE=4)" in lines["pmi"][0], lines
  assert "one of several tasks" in lines["pmix"][0], lines
  # The independent task gets past the check, to its missing data.
  _, err = independent.communicate(timeout=120)
  assert independent.returncode == 2, err[-3000:]
  assert "--distributed" not in err and "manifest.json" in err, err[-3000:]
