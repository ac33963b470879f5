"""Resume on another topology, with another batch, past an unreadable step.

One uninterrupted reference run (in this process: 1 process x 8 devices),
checkpointed after every step. Each resume starts from a copy of a workdir
whose later steps are removed, as a job preempted after that step's save
leaves it, and must end where the reference ended: the data position is
global and the train state replicated, so the topology may change. The
resumes chain (8 devices -> 1 x 4 -> 2 x 2 -> 1 x 4), so each one starts from
a step written by the topology before it, and one reference serves all.
"""
import json
import os
import shutil

import numpy as np
import pytest

from affectjax import train
from configs import custom_cnn
from tests import use_fixtures
from test_checkpoint import AbslWarnings
from test_end_to_end import (  # pylint: disable=unused-import
    _kill_leftovers, _finish_all, _metrics_lines, _start,
    _start_processes)

TOTAL = 4
TOL = 1e-4  # Other device counts sum in another order.


def _overrides(data_dir):
  return {"data.dir": data_dir, "total_steps": TOTAL, "log_every_steps": 1,
          "eval_every_steps": TOTAL, "checkpoint_every_steps": 1,
          "keep_checkpoints": TOTAL}


def _config(data_dir, **changes):
  return use_fixtures.override(custom_cnn.get_config("tiny"),
                               **{**_overrides(data_dir), **changes})


def _args(data_dir, workdir, cache):
  return ["--config=configs/custom_cnn.py:tiny", f"--workdir={workdir}",
          f"--config.compilation_cache_dir={cache}",
          *(f"--config.{k}={v}" for k, v in _overrides(data_dir).items())]


@pytest.fixture(scope="module")
def reference(synthetic_arrayrecord, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(_config(synthetic_arrayrecord), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _cut(source, workdir, step):
  """A copy of ``source`` as a job stopped after saving ``step`` leaves it."""
  shutil.copytree(source, workdir)
  ckpt = workdir / "checkpoints"
  for d in os.listdir(ckpt):
    if d.isdigit() and int(d) > step:
      shutil.rmtree(ckpt / d)
  return workdir


def _written_by(workdir, step):
  """(processes, devices) of the job that saved ``step``."""
  meta = workdir / "checkpoints" / str(step) / "position" / "metadata"
  position = json.loads(meta.read_text())
  return position["process_count"], position["device_count"]


def _resume(source, workdir, step, data_dir, cache, *, written_by, processes,
            devices):
  """Resumes a copy of ``source`` cut after ``step`` (which the ``written_by``
  topology saved) with the trainer CLI on ``processes`` x ``devices``."""
  workdir = _cut(source, workdir, step)
  assert _written_by(workdir, step) == written_by
  args = _args(data_dir, workdir, cache)
  if processes == 1:
    procs = [_start(args, devices=devices)]
  else:
    assert devices == 2
    procs = _start_processes(args, n=processes)
  outs = _finish_all(procs)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  resumed = outs[0][1].split("Resumed from")[1].splitlines()[0]
  assert resumed.endswith(f" at step {step}"), resumed
  return workdir


def _assert_same_run(workdir, reference, tol=TOL):
  """Same final weights and the same metrics lines as the reference."""
  step, params = use_fixtures.final_params(str(workdir))
  ref_step, ref_params = use_fixtures.final_params(str(reference))
  assert step == ref_step == TOTAL
  for x, y in zip(params, ref_params, strict=True):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
  lines, ref = _metrics_lines(workdir), _metrics_lines(reference)
  assert [(l["split"], l["step"]) for l in lines] == [
      (l["split"], l["step"]) for l in ref]
  for l, r in zip(lines, ref):
    for k in ("loss", "accuracy", "macro_f1", "valence_ccc", "arousal_ccc"):
      if isinstance(r.get(k), float):
        np.testing.assert_allclose(l[k], r[k], rtol=max(tol, 1e-5), atol=tol,
                                   err_msg=f"{k} at {r['split']} {r['step']}")


@pytest.fixture(scope="module")
def resumed_1x4(reference, synthetic_arrayrecord, cache, tmp_path_factory):
  """Saved at step 1 on 8 devices, resumed by 1 process x 4 devices."""
  return _resume(reference, tmp_path_factory.mktemp("r") / "wd", 1,
                 synthetic_arrayrecord, cache, written_by=(1, 8), processes=1,
                 devices=4)


@pytest.fixture(scope="module")
def resumed_2x2(resumed_1x4, synthetic_arrayrecord, cache, tmp_path_factory):
  """Saved at step 2 by 1 x 4, resumed by 2 processes x 2 devices."""
  return _resume(resumed_1x4, tmp_path_factory.mktemp("r") / "wd", 2,
                 synthetic_arrayrecord, cache, written_by=(1, 4), processes=2,
                 devices=2)


@pytest.mark.slow
def test_8_devices_resume_on_4(reference, resumed_1x4):
  _assert_same_run(resumed_1x4, reference)


@pytest.mark.slow
def test_1_process_resumes_as_2_processes(reference, resumed_2x2):
  assert _written_by(resumed_2x2, TOTAL) == (2, 4)
  _assert_same_run(resumed_2x2, reference)


@pytest.mark.slow
def test_2_processes_resume_as_1_process(reference, resumed_2x2,
                                         synthetic_arrayrecord, cache,
                                         tmp_path):
  workdir = _resume(resumed_2x2, tmp_path / "wd", 3, synthetic_arrayrecord,
                    cache, written_by=(2, 4), processes=1, devices=4)
  _assert_same_run(workdir, reference)


def test_another_global_batch_is_refused(reference, synthetic_arrayrecord,
                                         tmp_path):
  workdir = _cut(reference, tmp_path / "wd", 2)
  config = _config(synthetic_arrayrecord, batch_size=8)
  with pytest.raises(train.ConfigError, match=r"saved with a global batch of 16 "
                     r"\(--config.batch_size=16\), but this run has "
                     r"--config.batch_size=8"):
    train.train_and_evaluate(config, str(workdir))


def test_unreadable_latest_step_falls_back_to_the_one_before(
    reference, synthetic_arrayrecord, tmp_path):
  """A latest step whose array files were truncated (a lost write)."""
  workdir = _cut(reference, tmp_path / "wd", TOTAL)
  ckpt = workdir / "checkpoints"
  truncated = 0
  for root, _, files in os.walk(ckpt / str(TOTAL) / "state"):
    for f in files:
      path = os.path.join(root, f)
      size = os.path.getsize(path)
      if size > 64:
        os.truncate(path, size // 2)
        truncated += 1
  assert truncated
  with AbslWarnings() as warnings:
    train.train_and_evaluate(_config(synthetic_arrayrecord), str(workdir))
  bad = [m for m in warnings.messages
         if m.startswith(f"Checkpoint step {TOTAL} in {ckpt} cannot be read")]
  assert len(bad) == 1, warnings.messages
  assert "falling back to the one before it" in bad[0]
  assert (ckpt / f"{TOTAL}.corrupt").is_dir()  # Kept for inspection.
  assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [
      1, 2, 3, TOTAL]
  # Steps 3 -> 4 trained again, in the same topology: the same run.
  _assert_same_run(workdir, reference, tol=1e-6)
