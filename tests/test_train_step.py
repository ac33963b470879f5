"""The jitted train/eval steps: sharding invariance, learning, donation."""
import jax
import numpy as np
import pytest

from affectjax import sharding, train, train_state
from configs import custom_cnn


def _config():
  c = custom_cnn.get_config("tiny")
  c.model.kwargs.dropout = 0.0  # Dropout masks depend on the device layout.
  c.optimizer.warmup_steps = 0
  c.optimizer.learning_rate = 1e-2
  return c


def _batch(c, seed=0, n=16):
  rng = np.random.default_rng(seed)
  va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
  va[::5] = -2.0  # Some "no value" targets, masked in the loss.
  return {
      "image": rng.integers(0, 256, (n, c.image_size, c.image_size, 3), np.uint8),
      "expression": rng.integers(0, 8, (n,)).astype(np.int32),
      "valence": va[:, 0].copy(),
      "arousal": va[:, 1].copy(),
  }


def _run(devices, steps=3):
  c = _config()
  mesh = sharding.make_mesh(devices)
  graphdef, state, tx = train_state.init_state(c, mesh)
  train_fn, eval_fn = train.make_steps(graphdef, tx, c, mesh)
  losses = []
  for i in range(steps):
    batch = sharding.shard_batch(_batch(c, seed=i), mesh)
    state, m = train_fn(state, batch, train_backbone=True)
    losses.append(float(m["loss"]))
  eval_batch = dict(_batch(c, seed=99), mask=np.ones(16, np.float32))
  out, _ = eval_fn(state, sharding.shard_batch(eval_batch, mesh))
  return jax.device_get(state), losses, jax.device_get(out)


def test_one_and_eight_devices_agree():
  assert len(jax.devices()) == 8, "conftest must provide 8 CPU devices"
  s1, l1, o1 = _run(jax.devices()[:1])
  s8, l8, o8 = _run(jax.devices())
  np.testing.assert_allclose(l1, l8, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(b, np.float64), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(o1["va"], o8["va"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(o1["logits"], o8["logits"], rtol=1e-4, atol=1e-4)


def test_steps_learn_a_fixed_batch_and_count_steps():
  c = _config()
  mesh = sharding.make_mesh()
  graphdef, state, tx = train_state.init_state(c, mesh)
  train_fn, _ = train.make_steps(graphdef, tx, c, mesh)
  batch = sharding.shard_batch(_batch(c), mesh)
  first = None
  for _ in range(15):
    state, m = train_fn(state, batch, train_backbone=True)
    first = float(m["loss"]) if first is None else first
  assert int(state["step"]) == 15
  assert float(m["loss"]) < 0.7 * first
  # BatchNorm running statistics moved away from their initial values.
  rest = jax.tree.leaves(state["rest"])
  assert rest and any(np.abs(np.asarray(r)).sum() > 0 for r in rest)


def test_batch_that_does_not_divide_names_the_flag():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="config.batch_size=12"):
    sharding.local_batch_size(12, mesh, flag="config.batch_size")


def test_imagenet_init_offline_says_which_file_to_put_where(tmp_path,
                                                            monkeypatch):
  from affectjax.models import imagenet  # pylint: disable=g-import-not-at-top
  from configs import vgg16  # pylint: disable=g-import-not-at-top

  def offline(*args, **kwargs):
    raise OSError("no network in this test")
  monkeypatch.setattr(imagenet.urllib.request, "urlopen", offline)
  c = vgg16.get_config("tiny")
  c.model.init = "imagenet"
  c.model.weights_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError,
                     match="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"):
    train_state.init_state(c, sharding.make_mesh())
  c.model.init = "imagenet21k"
  with pytest.raises(ValueError, match="config.model.init"):
    train_state.init_state(c, sharding.make_mesh())
