"""examples/slurm/train.sbatch's decisions, run by bash with stand-ins for
srun, squeue, scontrol and scancel (the real-SLURM runs are in
tests/cluster/test_slurm.py, outside the suite): it requeues only when
squeue answers RUNNING, says so when it does not or when `scontrol requeue`
fails, and passes a SIGTERM to its shell on to the tasks once."""
import os
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")

# Each stand-in appends its name and arguments to $CALLS.
_FAKES = {
    "srun": """
        while [[ "$1" == --* ]]; do shift; done
        echo "srun $*" >> "$CALLS"
        exec "$@"
        """,
    "squeue": """
        echo "squeue $*" >> "$CALLS"
        echo -n "$FAKE_STATE"
        [[ -n "$FAKE_STATE" ]] && echo
        exit 0
        """,
    "scontrol": """
        echo "scontrol $*" >> "$CALLS"
        exit "${FAKE_SCONTROL_STATUS:-0}"
        """,
    "scancel": """
        echo "scancel $*" >> "$CALLS"
        kill -TERM "$(cat "$TASK_PID")"
        """,
    # The training task: exits 75 once it got SIGTERM (or at once when
    # FAKE_EXIT says so).
    "launch.sh": """
        echo $$ > "$TASK_PID"
        [[ -n "${FAKE_EXIT:-}" ]] && exit "$FAKE_EXIT"
        trap 'sleep 2; exit 75' TERM
        echo "task ready" >> "$CALLS"
        for i in $(seq 600); do sleep 0.1; done
        exit 0
        """,
}


@pytest.fixture
def job(tmp_path):
  """Runs the script as SLURM's batch step would; returns (Popen, calls)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in _FAKES.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + "\n".join(
        l[8:] for l in body.splitlines()) + "\n")
    path.chmod(0o755)
  calls = tmp_path / "calls"
  calls.write_text("")
  started = []

  def start(**env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
                AFFECTJAX_ROOT=str(bin_dir), CALLS=str(calls),
                TASK_PID=str(tmp_path / "task.pid"), **env)
    p = subprocess.Popen(["bash", SBATCH, "--workdir=w"], env=full,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    started.append(p)
    return p

  yield start, calls
  for p in started:
    if p.poll() is None:
      p.kill()
      p.wait()


def _lines(calls, prefix):
  return [l for l in calls.read_text().splitlines() if l.startswith(prefix)]


def test_requeues_when_running(job):
  start, calls = job
  p = start(FAKE_EXIT="75", FAKE_STATE="RUNNING")
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 75, out
  assert "requeueing job 42" in out
  assert _lines(calls, "scontrol") == ["scontrol requeue 42"]


def test_no_answer_from_squeue_means_no_requeue(job):
  start, calls = job
  p = start(FAKE_EXIT="75", FAKE_STATE="")
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 75, out
  assert "squeue gave no state for job 42: not requeued" in out, out
  assert _lines(calls, "scontrol") == []


def test_a_failed_requeue_is_reported(job):
  start, calls = job
  p = start(FAKE_EXIT="75", FAKE_STATE="RUNNING", FAKE_SCONTROL_STATUS="1")
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 75, out
  assert "scontrol requeue failed (exit 1): job 42 is NOT requeued" in out, out


def test_sigterm_to_the_batch_shell_is_passed_on_once(job):
  """`scancel --batch --signal=TERM`, twice: the tasks are told once, stop
  (exit 75) and the job is requeued."""
  start, calls = job
  p = start(FAKE_STATE="RUNNING")
  deadline = time.monotonic() + 30
  while not _lines(calls, "task ready"):
    assert time.monotonic() < deadline and p.poll() is None
    time.sleep(0.02)
  p.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 75, out
  assert _lines(calls, "scancel") == ["scancel --signal=TERM 42"], out
  assert "passing it on to the training tasks" in out
  assert "already passed on" in out
  assert _lines(calls, "scontrol") == ["scontrol requeue 42"], out
