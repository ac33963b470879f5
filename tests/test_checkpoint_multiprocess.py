"""Restoring with several processes when one of them cannot read the step.

Real 2-process runs (jax.distributed on 127.0.0.1, gloo), each process with
its own directory view: process 1 reads a copy of the checkpoints whose
newest step's array files are truncated (damage only it sees), or reads
through a storage that times out. Orbax's restore ends in a barrier of every
process, so before the fix the process that could read waited there (and its
next collective paired with the other's): both hung.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import glob, json, os, shutil, sys, time
from affectjax import distributed
port, pid, root, how = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                       num_processes=2, process_id=pid)
import jax, numpy as np
from jax.experimental import multihost_utils
from affectjax import checkpoint as ckpt_lib

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

def state(seed):
  values = {"w": np.full((64, 64), seed, np.float32),
            "b": np.arange(4, dtype=np.float32) + seed}
  return {k: jax.make_array_from_callback(v.shape, replicated,
                                          lambda i, v=v: v[i])
          for k, v in values.items()}

shared = os.path.join(root, "checkpoints")
c = ckpt_lib.Checkpointer(shared, every_steps=1, keep=3)
c.save(1, state(1), wait=True)
c.save(2, state(2), wait=True)
c.close()
multihost_utils.sync_global_devices("saved")
if pid == 0:  # Process 1's view: the same steps, step 2's arrays truncated.
  shutil.copytree(shared, os.path.join(root, "view_1"))
  for path in glob.glob(os.path.join(root, "view_1", "2", "state", "**", "d",
                                     "*"), recursive=True):
    os.truncate(path, 10)
multihost_utils.sync_global_devices("copied")
mine = shared if pid == 0 or how == "transient" else os.path.join(root, "view_1")
if how == "transient" and pid == 1:
  import tensorstore
  def timeout(*args, **kwargs):
    raise TimeoutError("injected: the storage did not answer")
  tensorstore.open = timeout
c = ckpt_lib.Checkpointer(mine, every_steps=1, keep=3)
t0 = time.monotonic()
out = {}
try:
  restored, step = c.restore_latest(ckpt_lib.abstract_like(state(0)))
  out["step"] = step
  out["b0"] = float(np.asarray(restored["b"].addressable_data(0))[0])
except ckpt_lib.CheckpointReadError as e:
  out["error"] = str(e)
out["seconds"] = time.monotonic() - t0
out["listing"] = sorted(os.listdir(mine))
c.close()
print("RESULT " + json.dumps(out), flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(tmp_path, how):
  script = tmp_path / "restore.py"
  script.write_text(textwrap.dedent(_SCRIPT))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), str(tmp_path), how],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=240)
      assert p.returncode == 0, err[-3000:]
      line = [l for l in out.splitlines() if l.startswith("RESULT ")]
      assert line, err[-3000:]
      results.append(json.loads(line[0][len("RESULT "):]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return results


@pytest.mark.slow  # Two processes importing JAX and Orbax.
def test_a_step_one_process_finds_damaged_is_set_aside_by_all(tmp_path):
  first, second = _run_two(tmp_path, "damaged")
  for r in (first, second):
    assert r.get("step") == 1 and r["b0"] == 1.0, r  # Both fell back.
    assert r["seconds"] < 60, r  # Not Orbax's 300 s barrier.
  assert first["listing"] == ["1", "2.corrupt"]  # Process 0 moved it aside.


@pytest.mark.slow
def test_a_transient_error_on_one_process_stops_all_and_moves_nothing(
    tmp_path):
  first, second = _run_two(tmp_path, "transient")
  assert "injected: the storage did not answer" in second.get("error", ""), second
  assert "on process 1 (its log names the error)" in first.get("error", ""), first
  for r in (first, second):
    assert "every step stays where it is" in r["error"]
    assert r["seconds"] < 60, r
    assert r["listing"] == ["1", "2"]
