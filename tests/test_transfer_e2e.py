"""The transfer modes the ImageNet configs ship with, through `train_and_evaluate`.

`small_run` (the :tiny and :demo variants) forces `transfer.mode=full`, so
these put the shipped settings back (`frozen`, or `two_phase` with the
backbone at 0.1x) on the tests' tiny custom CNN: it has the same
backbone/head split as VGG16 and EfficientNet, and BatchNorm in its backbone
(whose statistics a frozen backbone must not move either), at a fraction of
their compile time. Every checkpointed step is compared with the initial
state, leaf by leaf and bit for bit.
"""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import sharding, train, train_state
from configs import custom_cnn


def _config(data_dir, mode, total_steps, **transfer):
  c = custom_cnn.get_config("tiny")
  c.data.dir = data_dir
  c.total_steps = total_steps
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.eval_every_steps = total_steps  # One evaluation, at the end.
  c.keep_checkpoints = total_steps
  c.optimizer.warmup_steps = 0  # Else step 0's rate is 0 and moves nothing.
  c.transfer.mode = mode
  for key, value in transfer.items():
    c.transfer[key] = value
  return c


def _states(config, workdir, steps=None) -> dict[int, dict]:
  """{step: host state} of the run's checkpoints; step 0 is the initial state."""
  _, init, _ = train_state.init_state(config, sharding.make_mesh())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               every_steps=1, keep=1)
  try:
    steps = ckpt.all_steps() if steps is None else steps
    out = {s: jax.device_get(ckpt.restore(s, ckpt_lib.abstract_like(init)))
           for s in steps}
  finally:
    ckpt.close()
  out[0] = jax.device_get(init)
  return out


def _part(state, group):
  """The params and BatchNorm statistics of 'backbone' or 'head'."""
  rest = state["rest"]
  return [np.asarray(x) for x in jax.tree.leaves(
      {"params": state["params"][group],
       "rest": rest[group] if group in rest else {}})]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _report_best_step(workdir) -> int | None:
  text = open(os.path.join(workdir, "report.html")).read()
  section = text.split("<h2>Best checkpoint</h2>", 1)[1].split("<h2>", 1)[0]
  found = re.search(r"<th>step</th><td>(\d+)</td>", section)
  return int(found.group(1)) if found else None


def test_frozen_backbone_is_bit_unchanged(synthetic_arrayrecord, tmp_path):
  workdir = str(tmp_path)
  config = _config(synthetic_arrayrecord, "frozen", 2)
  assert train.train_and_evaluate(config, workdir)["step"] == 2
  states = _states(config, workdir)
  assert sorted(states) == [0, 1, 2]
  backbone = _part(states[0], "backbone")
  # Convolution kernels and BatchNorm scale, bias, mean and variance.
  assert len(backbone) >= 10
  for step in (1, 2):
    assert _same(_part(states[step], "backbone"), backbone), step
    assert not _same(_part(states[step], "head"),
                     _part(states[step - 1], "head")), step
  # The report refreshed at the (only) evaluation names the step best.json
  # names: it is written after the step is ranked, not before.
  best = json.load(open(os.path.join(workdir, "checkpoints", "best.json")))
  assert best["step"] == 2
  assert _report_best_step(workdir) == best["step"]


def test_two_phase_unfreezes_at_its_step_and_resumes_across_it(
    synthetic_arrayrecord, tmp_path):
  unfreeze = 2
  workdir = str(tmp_path / "run")
  config = _config(synthetic_arrayrecord, "two_phase", 4,
                   unfreeze_step=unfreeze, backbone_lr_multiplier=0.1)
  train.train_and_evaluate(config, workdir)
  states = _states(config, workdir)
  assert sorted(states) == [0, 1, 2, 3, 4]
  # After `unfreeze` steps (0 .. unfreeze - 1 frozen) the backbone is still
  # the initial one; every later step moves it.
  for step in range(1, unfreeze + 1):
    assert _same(_part(states[step], "backbone"),
                 _part(states[0], "backbone")), step
  for step in range(unfreeze + 1, 5):
    assert not _same(_part(states[step], "backbone"),
                     _part(states[step - 1], "backbone")), step
  for step in range(1, 5):
    assert not _same(_part(states[step], "head"),
                     _part(states[step - 1], "head")), step

  # A run stopped after step 1 (before the unfreeze step) and resumed ends
  # exactly where the uninterrupted one did.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  for step in range(2, 5):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  assert train.train_and_evaluate(config, resumed)["step"] == 4
  final = _states(config, resumed, steps=[4])[4]
  for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(states[4]),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
