"""Real Orbax checkpoints of a train-state-shaped pytree and a Grain iterator."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
