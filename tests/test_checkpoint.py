"""Real Orbax checkpoints of a train-state-shaped pytree and a Grain iterator."""
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging as absl_logging

from affectjax import checkpoint as ckpt_lib


def _state(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = tx.init(params)
  # Take one real step so the moments are non-zero.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"step": jnp.asarray(7, jnp.int32), "params": params,
          "rest": {"mean": jnp.arange(4.0)}, "opt_state": opt_state}


def test_roundtrip_keeps_values_and_optax_types(tmp_path):
  state = _state(0)
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=2)
  c.save(7, state)
  c.wait()
  assert c.latest_step() == 7
  restored = c.restore(7, ckpt_lib.abstract_like(_state(1)))
  c.close()
  # Same tree structure, including optax's namedtuple states (not lists).
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert type(restored["opt_state"][1][0]).__name__ == type(
      state["opt_state"][1][0]).__name__
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_n_and_resumes_data_iterator(tmp_path):
  ds = grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset()
  it = iter(ds)
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=2)
  seen = []
  for step in range(1, 7):
    seen.append(next(it))
    if c.should_save(step, total_steps=6):
      c.save(step, _state(step), it)
  c.wait()
  assert c._manager.all_steps() == [4, 6]  # pylint: disable=protected-access
  expected_next = next(it)

  it2 = iter(ds)
  c2 = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=2)
  c2.restore(c2.latest_step(), ckpt_lib.abstract_like(_state(0)), it2)
  np.testing.assert_array_equal(next(it2), expected_next)
  c.close()
  c2.close()


def test_should_save_schedule(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=5, keep=1)
  assert [s for s in range(1, 13) if c.should_save(s, 12)] == [5, 10, 12]
  c.close()


def test_keeps_best_besides_latest_and_records_it(tmp_path):
  """Orbax's BestN + LatestN: the best step survives after falling out of the latest N."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(tmp_path) / "ckpt"  # A Path object, not a str.
  c = ckpt_lib.Checkpointer(directory, every_steps=1, keep=2,
                            best_metric="macro_f1", best_mode="max")
  f1 = {1: 0.2, 2: 0.9, 3: 0.5, 4: float("nan"), 5: 0.4, 6: 0.1}
  for step, value in f1.items():
    metrics = {"macro_f1": value, "accuracy": 0.5,
               "confusion_matrix": [[1]]} if step != 5 else None
    c.save(step, _state(step), metrics=metrics, wait=(step == 3))
  c.wait()
  assert c.all_steps() == [2, 5, 6]
  assert c.best_step() == 2
  assert ckpt_lib.read_best_record(directory) == {
      "step": 2, "metric": "macro_f1", "mode": "max", "value": 0.9}
  c.close()
  # A fresh manager (another process: evaluate) finds the same best step.
  c2 = ckpt_lib.Checkpointer(str(directory), every_steps=1, keep=2,
                             best_metric="macro_f1", best_mode="max")
  assert c2.best_step() == 2
  assert c2.metrics(2)["accuracy"] == 0.5
  c2.close()


def test_best_mode_min_and_bad_metric_name(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1,
                            best_metric="loss", best_mode="min")
  for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
    c.save(step, _state(step), metrics={"loss": loss})
  c.wait()
  assert c.all_steps() == [2, 3] and c.best_step() == 2
  with pytest.raises(KeyError, match="best_metric='loss'"):
    c.save(4, _state(4), metrics={"accuracy": 1.0})
  c.close()
  with pytest.raises(ValueError, match="best_mode"):
    ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1,
                          best_metric="loss", best_mode="lowest")


def test_no_best_metric_means_no_best_step(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  c.save(1, _state(1), metrics={"macro_f1": 0.3}, wait=True)
  assert c.best_step() is None and c.latest_step() == 1
  c.close()


@pytest.mark.parametrize("mode,metric", [("max", "macro_f1"), ("min", "loss")])
def test_tied_evaluations_best_json_names_the_step_orbax_keeps(tmp_path, mode,
                                                               metric):
  """Two evaluations tie; later saves push one of them out of the latest 2,
  and Orbax deletes it. best.json (and best_step) must name the one it
  keeps: the later (BestN's stable sort), also while both are on disk."""
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2,
                            best_metric=metric, best_mode=mode)
  worse = 0.1 if mode == "max" else 0.9
  saves = {1: worse, 2: 0.5, 3: 0.5, 4: None, 5: None}
  for step, value in saves.items():
    c.save(step, _state(step),
           metrics=None if value is None else {metric: value})
  c.wait()
  assert c.all_steps() == [3, 4, 5]  # The latest 2, and the tie BestN kept.
  assert c.best_step() == 3
  assert ckpt_lib.read_best_record(tmp_path)["step"] == 3
  c.close()


class AbslWarnings(logging.Handler):
  """Collects the warnings logged through absl (Orbax's, affectjax's) while
  installed: ``with AbslWarnings() as w: ...; w.messages``."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    absl_logging.get_absl_logger().addHandler(self)
    return self

  def __exit__(self, *exc):
    absl_logging.get_absl_logger().removeHandler(self)


def test_save_without_metrics_logs_no_warning(tmp_path):
  """A periodic save (no evaluation) while best-keeping is on is normal."""
  with AbslWarnings() as warnings:
    c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2,
                              best_metric="macro_f1")
    c.save(1, _state(1))
    c.save(2, _state(2), metrics={"macro_f1": 0.3})
    c.save(3, _state(3), wait=True)
    c.close()
  assert warnings.messages == []
  assert c.metrics(2) == {"macro_f1": 0.3}  # Metrics are still saved.


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4)
              .to_iter_dataset())


def test_data_position_is_stored_once_with_the_global_batch(tmp_path):
  it = _iterator()
  for _ in range(3):
    next(it)
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=1,
                            global_batch_size=4)
  c.save(3, _state(3), it, wait=True)
  c.close()
  step_dir = tmp_path / "3"
  assert not (step_dir / "data").exists()  # No per-process files.
  position = json.loads((step_dir / ckpt_lib.POSITION / "metadata").read_text())
  assert position["iterator"] == {"next_index": 3}
  assert position["global_batch_size"] == 4

  # Another global batch: refused, naming the flag and both values.
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=1,
                            global_batch_size=8)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r"global batch of 4 \(--config.batch_size=4\), but "
                     r"this run has --config.batch_size=8"):
    c.restore(3, ckpt_lib.abstract_like(_state(0)), _iterator())
  # The state alone (evaluate, export) needs no data position check.
  c.restore(3, ckpt_lib.abstract_like(_state(0)))
  c.close()


def test_reads_checkpoints_with_per_process_grain_files(tmp_path):
  """Steps saved before the global position item: Grain's process files."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = _iterator()
  for _ in range(5):
    next(it)
  old = ocp.CheckpointManager(tmp_path, item_names=("state", "data"))
  old.save(5, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(5)),
      data=grain.checkpoint.CheckpointSave(it)))
  old.wait_until_finished()
  old.close()
  expected = next(it)
  assert os.listdir(tmp_path / "5" / "data").count("process_0-of-1.json") == 1

  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2,
                            global_batch_size=4)
  it2 = _iterator()
  state, step = c.restore_latest(ckpt_lib.abstract_like(_state(0)), it2)
  assert step == 5 and int(state["step"]) == 7
  np.testing.assert_array_equal(next(it2), expected)

  # Process files that disagree have no one global position: refused.
  data_dir = tmp_path / "5" / "data"
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  (data_dir / "process_1-of-2.json").write_text('{"next_index": 9}')
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r"different data positions.*process_0-of-2.json: "
                     r"\{'next_index': 5\}.*process_1-of-2.json: "
                     r"\{'next_index': 9\}"):
    c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  c.close()


def test_no_readable_step_stops_instead_of_starting_over(tmp_path):
  """A changed model (here: another weight shape) fails every step: an
  error, and the steps stay where they are (none is set aside)."""
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2)
  for step in (1, 2):
    c.save(step, _state(step), _iterator())
  c.wait()
  other = _state(0)
  other["params"]["w"] = jnp.zeros((5, 4))
  with pytest.raises(RuntimeError, match=r"No checkpoint in .* can be "
                     r"restored \(steps \[2, 1\]\); the newest, step 2"):
    c.restore_latest(ckpt_lib.abstract_like(other), _iterator())
  assert c.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  c.close()
