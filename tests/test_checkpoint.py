"""Real Orbax checkpoints of a train-state-shaped pytree and a Grain iterator."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
