"""A save onto a full or read-only filesystem, or to storage that does not
answer: a clear error, the previous checkpoint intact, and (through the
trainer) exit status 1.

The checkpoints go to a real size-limited tmpfs, mounted in a private mount
namespace (``unshare``: root, or an unprivileged user namespace) so nothing
outside the test sees it. Where no namespace can be made, the same script
makes writes fail for real by other means: a file-size limit
(``RLIMIT_FSIZE``, EFBIG) for the full disk, and a directory without write
permission for the read-only one (for root, whom permissions do not bind, a
file-size limit of 0).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import errno, json, os, resource, signal, subprocess, sys
import jax, jax.numpy as jnp, numpy as np, optax
from affectjax import checkpoint as ckpt_lib

root, how = sys.argv[1], sys.argv[2]
ckpt_dir = os.path.join(root, "checkpoints")
out = {}

def state(seed):
  params = {"w": jax.random.normal(jax.random.key(seed), (128, 128))}
  tx = optax.adam(1e-3)
  return {"step": jnp.asarray(seed, jnp.int32), "params": params,
          "opt_state": tx.init(params)}

def try_save(c, step):
  try:
    c.save(step, state(step), wait=True)
  except ckpt_lib.CheckpointWriteError as e:
    return str(e)
  return None

if how == "tmpfs":
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", root],
                 check=True)
c = ckpt_lib.Checkpointer(ckpt_dir, every_steps=1, keep=3)
c.save(1, state(1), wait=True)

# Full: fill what is left, so the next save (about 200 KB) cannot fit.
if how == "tmpfs":
  fd = os.open(os.path.join(root, "filler"), os.O_WRONLY | os.O_CREAT)
  try:
    while True:
      os.write(fd, b"\0" * 4096)
  except OSError as e:
    out["filler_errno"] = e.errno
  os.close(fd)
  st = os.statvfs(root)
  out["free_bytes"] = st.f_bavail * st.f_frsize
else:  # Files may not grow past 1 KB any more (EFBIG instead of SIGXFSZ).
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
out["full"] = try_save(c, 2)
c.close()
if how != "tmpfs":
  resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)

def intact():
  c = ckpt_lib.Checkpointer(ckpt_dir, every_steps=1, keep=3)
  steps = c.all_steps()
  got = c.restore(1, ckpt_lib.abstract_like(state(0)))
  c.close()
  same = all(np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(got), jax.tree.leaves(state(1))))
  return {"steps": steps, "same": bool(same)}

out["after_full"] = intact()

# Read-only.
if how == "tmpfs":
  os.remove(os.path.join(root, "filler"))
  subprocess.run(["mount", "-o", "remount,ro", root], check=True)
elif os.geteuid() != 0:
  os.chmod(ckpt_dir, 0o555)
else:  # Permissions do not bind root: no file may grow at all.
  resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
c = ckpt_lib.Checkpointer(ckpt_dir, every_steps=1, keep=3)
out["read_only"] = try_save(c, 3)
c.close()
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
out["after_read_only"] = intact()
print("RESULT " + json.dumps(out), flush=True)
"""


def _namespace_prefix():
  """``unshare`` arguments for a private mount namespace, or None."""
  if shutil.which("unshare") is None:
    return None
  for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode == 0 and (prefix[1] == "-rm" or os.geteuid() == 0):
      return prefix
  return None


def test_full_and_read_only_saves_fail_clearly_and_keep_the_last_checkpoint(
    tmp_path):
  script = tmp_path / "faults.py"
  script.write_text(textwrap.dedent(_SCRIPT))
  root = tmp_path / "mnt"
  root.mkdir()
  prefix = _namespace_prefix()
  how = "tmpfs" if prefix else "limits"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run([*(prefix or []), sys.executable, str(script),
                         str(root), how], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  out = json.loads(line[0][len("RESULT "):])
  ckpt_dir = str(root / "checkpoints")

  if how == "tmpfs":  # The fault really happened: the disk was full.
    assert out["filler_errno"] == 28 and out["free_bytes"] < 64 * 1024, out
  assert out["full"] is not None, "the save onto a full disk did not fail"
  assert out["full"].startswith(
      f"Could not save the checkpoint of step 2 to {ckpt_dir}: "), out["full"]
  assert ("No space left on device" if how == "tmpfs" else
          "File too large") in out["full"], out["full"]
  assert "steps [1]) are intact" in out["full"]
  assert out["after_full"] == {"steps": [1], "same": True}

  assert out["read_only"] is not None, "the save to a read-only dir did not fail"
  assert out["read_only"].startswith(
      f"Could not save the checkpoint of step 3 to {ckpt_dir}: ")
  expected = {"tmpfs": "Read-only file system", "limits": "Permission denied"
              if os.geteuid() else "File too large"}[how]
  assert expected in out["read_only"], out["read_only"]
  assert out["after_read_only"] == {"steps": [1], "same": True}


# --------------------------------------------------------------------------
# Through the trainer: the exit status a failure policy sees. A save that
# fails on storage is a failure (exit 1, "read the log"), never a usage
# error (exit 2, "fix the command"), and prints one clear line; Orbax's
# tracebacks of it are in the log at INFO (--verbosity=0 shows them).
# --------------------------------------------------------------------------
TINY = "configs/custom_cnn.py"
# tensorstore is what Orbax writes arrays through; here it times out, as a
# gs:// bucket that does not answer does.
_STORAGE_TIMES_OUT = (
    "import sys, tensorstore\n"
    "def timeout(*args, **kwargs):\n"
    "  raise TimeoutError('injected: the bucket did not answer')\n"
    "tensorstore.open = timeout\n"
    "sys.argv[0] = 'affectjax.main'\n"
    "from affectjax import main\n"
    "main.run()\n")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory, synthetic_arrayrecord):
  """{case: (exit status, stdout + stderr, checkpoint dir)}, run together.

  The storage timeout is injected in the trainer's own process and runs
  everywhere; the full disks are a tmpfs in a private mount namespace, so
  they run only where one can be made (absent from the dict elsewhere).
  """
  prefix = _namespace_prefix()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  mount = ("mkdir -p \"$0\" && mount -t tmpfs -o size=16k tmpfs \"$0\" && "
           "exec \"$@\"")
  procs = {}
  for case in ("full_disk", "full_disk_verbose", "storage_timeout"):
    if prefix is None and case != "storage_timeout":
      continue
    workdir = tmp_path_factory.mktemp(case) / "wd"
    args = [f"--config={TINY}:tiny",
            f"--config.data.dir={synthetic_arrayrecord}",
            f"--workdir={workdir}", "--config.total_steps=2",
            "--config.checkpoint_every_steps=1", "--config.eval_every_steps=2",
            "--config.compilation_cache_dir="]
    if case == "storage_timeout":
      cmd = [sys.executable, "-c", _STORAGE_TIMES_OUT, *args]
    else:
      cmd = [*prefix, "sh", "-c", mount, str(workdir / "checkpoints"),
             sys.executable, "-m", "affectjax.main", *args]
      if case == "full_disk_verbose":
        cmd.append("--verbosity=0")
    procs[case] = (subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE),
                   str(workdir / "checkpoints"))
  out = {}
  for case, (proc, ckpt_dir) in procs.items():
    try:
      stdout, stderr = proc.communicate(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
    out[case] = (proc.returncode, stdout + stderr, ckpt_dir)
  return out


def _full_disk(trainer_runs, case):
  if case not in trainer_runs:
    pytest.skip("a full disk needs a private mount namespace (unshare -m as "
                "root, or unprivileged user namespaces)")
  return trainer_runs[case]


def _one_line(text, prefix):
  lines = [l for l in text.splitlines() if l.startswith(prefix)]
  assert len(lines) == 1, text[-5000:]
  return lines[0]


@pytest.mark.slow  # Three trainer processes.
def test_a_full_disk_exits_1_with_one_clear_line(trainer_runs):
  status, text, ckpt_dir = _full_disk(trainer_runs, "full_disk")
  assert status == 1, text[-5000:]
  line = _one_line(text, "affectjax.main: ")
  assert line.startswith("affectjax.main: Could not save the checkpoint of "
                         f"step 1 to {ckpt_dir}: "), line
  assert "No space left on device" in line and (
      "then rerun the same command") in line, line
  assert "Traceback" not in text, text[-5000:]
  # No ERROR lines of Orbax's (absl's "E1205 ..." prefix).
  assert not re.search(r"^E\d{4} ", text, re.M), text[-5000:]


@pytest.mark.slow
def test_verbosity_shows_orbax_tracebacks_and_keeps_the_status(trainer_runs):
  status, text, ckpt_dir = _full_disk(trainer_runs, "full_disk_verbose")
  assert status == 1, text[-5000:]
  assert "Traceback" in text
  # Orbax's ERRORs of the failed save, with their tracebacks, now at INFO.
  orbax = r"(future|async_checkpointer|checkpoint_manager)\.py:\d+\] .*"
  assert re.search(rf"^I\d{{4}} [\d:.]+ +\d+ {orbax}(raised an exception|"
                   r"Failed to run|failed)", text, re.M), text[-5000:]
  assert not re.search(rf"^E\d{{4}} [\d:.]+ +\d+ {orbax}", text, re.M)
  line = _one_line(text, "affectjax.main: Could not save")
  assert ckpt_dir in line


@pytest.mark.slow
def test_a_storage_timeout_while_saving_exits_1(trainer_runs):
  status, text, _ = trainer_runs["storage_timeout"]
  assert status == 1, text[-5000:]
  line = _one_line(text, "affectjax.main: ")
  assert "Could not save the checkpoint of step 1" in line, line
  assert "TimeoutError: injected: the bucket did not answer" in line, line
  assert "The storage did not answer; once it does, then rerun" in line, line
  assert "Traceback" not in text, text[-5000:]
