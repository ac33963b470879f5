"""Synthetic AffectNet -> ArrayRecords -> train -> eval -> checkpoint -> resume."""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import sharding, train
from configs import custom_cnn

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
  _, state, _ = train.init_state(config, mesh)
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
  assert sorted(os.listdir(ckpt_dir), key=int) == ["3", "6", "8"]
  uninterrupted = _final_state(config, workdir)

  # A run killed after its step-3 checkpoint leaves just that one on disk.
  for step in ("6", "8"):
    shutil.rmtree(os.path.join(ckpt_dir, step))
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 8
  steps = [l["step"] for l in _lines(workdir) if l["split"] == "train"]
  assert steps == [2, 4, 6, 8, 4, 6, 8]  # Continued from 3, not from 0.
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


def test_command_line_overrides_and_summary(synthetic_arrayrecord, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "affectjax.main",
       "--config=configs/custom_cnn.py:tiny",
       f"--config.data.dir={synthetic_arrayrecord}", "--config.total_steps=2",
       "--config.eval_every_steps=2", f"--workdir={tmp_path}"],
      cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Expression accuracy" in out.stdout and "Valence CCC" in out.stdout
  assert json.load(open(tmp_path / "config.json"))["total_steps"] == 2

  bad = subprocess.run(
      [sys.executable, "-m", "affectjax.main",
       "--config=configs/custom_cnn.py:tiny", "--config.batch_sizes=3",
       f"--workdir={tmp_path}"],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "batch_sizes" in bad.stderr


def test_missing_data_dir_names_the_flag(tmp_path):
  c = _config(str(tmp_path / "nowhere"), 2)
  with pytest.raises(FileNotFoundError, match="config.data.dir=.*nowhere"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(synthetic_arrayrecord, tmp_path):
  """A real jax.distributed run: 2 processes x 2 CPU devices, gloo collectives."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "affectjax.main",
       "--config=configs/custom_cnn.py:tiny",
       f"--config.data.dir={synthetic_arrayrecord}", "--config.total_steps=4",
       "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4",
       f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Expression accuracy" in outs[0][0]  # Only process 0 prints.
  assert "Expression accuracy" not in outs[1][0]
  lines = _lines(str(tmp_path))
  val = [l for l in lines if l["split"] == "val"]
  assert val and val[-1]["step"] == 4 and val[-1]["num_examples"] == 52
  data_dir = tmp_path / "checkpoints" / "4" / "data"
  assert sorted(f for f in os.listdir(data_dir) if f.startswith("process_")
                ) == ["process_0-of-2.json", "process_1-of-2.json"]
