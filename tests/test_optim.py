"""Optimizer and transfer-learning modes, checked with real jitted train steps of a tiny model.

The step below is our own pure step (merge -> loss -> grad -> optax update ->
new state), shaped like the trainer's: the backbone's BatchNorm mode is the
static `train_backbone` flag from `optim.backbone_trainable`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from affectjax import models
from affectjax import optim
from configs import custom_cnn


def tiny_config(**transfer):
  c = custom_cnn.get_config("tiny")
  c.total_steps = 6
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.optimizer.learning_rate = 1e-2
  for k, v in transfer.items():
    c.transfer[k] = v
  return c


def make_state(config, seed=0):
  model = models.create("custom_cnn", rngs=nnx.Rngs(seed), widths=(4, 8),
                        head_hidden=8, dropout=0.0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.create(config, params)
  return graphdef, params, rest, tx, tx.init(params)


def batch(seed=0, n=8, size=16):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          rng.integers(0, 8, (n,)).astype(np.int32),
          rng.uniform(-1, 1, (n, 2)).astype(np.float32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def train_step(graphdef, tx, train_backbone, params, rest, opt_state, images,
               labels, va, key):
  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest, copy=True)
    logits, pred_va = model(model.preprocess(images), train=True,
                            train_backbone=train_backbone,
                            rngs=nnx.Rngs(dropout=key))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + jnp.mean((pred_va - va) ** 2), nnx.state(model, nnx.Not(nnx.Param))
  (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_rest, opt_state, loss


def run(config, steps, seed=0):
  """Runs `steps` real steps; returns the (params, rest) after every step, the initial first."""
  graphdef, params, rest, tx, opt_state = make_state(config)
  history = [(params, rest)]
  for step in range(steps):
    images, labels, va = batch(seed + step)
    params, rest, opt_state, loss = train_step(
        graphdef, tx, optim.backbone_trainable(config, step), params, rest,
        opt_state, images, labels, va, jax.random.key(step))
    assert np.isfinite(float(loss))
    history.append((params, rest))
  return history


def pure(state, group):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state)[group])


def bitwise_equal(a, b):
  return all(np.array_equal(x, y) and x.dtype == y.dtype
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def all_changed(a, b):
  return all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_backbone_params_and_batchnorm_stats_stay_bitwise_equal():
  config = tiny_config(mode="frozen")
  history = run(config, steps=3)
  (p0, r0), (p3, r3) = history[0], history[-1]
  assert bitwise_equal(pure(p0, "backbone"), pure(p3, "backbone"))
  assert bitwise_equal(pure(r0, "backbone"), pure(r3, "backbone"))  # BN moving stats.
  assert all_changed(pure(p0, "head"), pure(p3, "head"))


def test_two_phase_unfreezes_at_the_configured_step():
  config = tiny_config(mode="two_phase", unfreeze_step=2)
  assert [optim.backbone_trainable(config, s) for s in range(4)] == [False, False, True, True]
  history = run(config, steps=4)
  p0, r0 = history[0]
  for step in (1, 2):  # After steps 0 and 1: frozen.
    assert bitwise_equal(pure(p0, "backbone"), pure(history[step][0], "backbone"))
    assert bitwise_equal(pure(r0, "backbone"), pure(history[step][1], "backbone"))
    assert all_changed(pure(p0, "head"), pure(history[step][0], "head"))
  # Step 2 trains the backbone: every kernel and BN statistic moves.
  assert all_changed(pure(history[2][0], "backbone"), pure(history[3][0], "backbone"))
  assert all_changed(pure(history[2][1], "backbone"), pure(history[3][1], "backbone"))


def test_full_mode_trains_everything():
  history = run(tiny_config(mode="full"), steps=2)
  for group in ("backbone", "head"):
    assert all_changed(pure(history[0][0], group), pure(history[-1][0], group))
  assert all_changed(pure(history[0][1], "backbone"), pure(history[-1][1], "backbone"))


@pytest.mark.parametrize("mode,multiplier", [("full", 0.1), ("two_phase", 0.25)])
def test_backbone_learning_rate_multiplier(mode, multiplier):
  """Plain SGD, no decay/clipping: the first backbone update is -lr * multiplier * grad."""
  config = tiny_config(mode=mode, unfreeze_step=0, backbone_lr_multiplier=multiplier)
  config.optimizer.name, config.optimizer.momentum = "sgd", 0.0
  config.optimizer.weight_decay, config.optimizer.grad_clip_norm = 0.0, 0.0
  _, params, _, tx, opt_state = make_state(config)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, opt_state, params)
  lr = config.optimizer.learning_rate
  for u in jax.tree.leaves(nnx.to_pure_dict(updates)["backbone"]):
    np.testing.assert_allclose(u, -lr * multiplier * 0.5, rtol=1e-6)
  for u in jax.tree.leaves(nnx.to_pure_dict(updates)["head"]):
    np.testing.assert_allclose(u, -lr * 0.5, rtol=1e-6)


def test_two_phase_backbone_optimizer_state_starts_clean():
  """Adam moments and count of the backbone stay at init while frozen, then advance."""
  config = tiny_config(mode="two_phase", unfreeze_step=2)
  _, params, _, tx, state0 = make_state(config)
  grads = jax.tree.map(jnp.ones_like, params)
  state = state0
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    assert all(np.all(np.asarray(u) == 0)
               for u in jax.tree.leaves(nnx.to_pure_dict(updates)["backbone"]))
  inner = lambda s: s[1].inner_states["backbone"].inner_state.inner
  assert bitwise_equal(inner(state0), inner(state))
  updates, state = tx.update(grads, state, params)
  assert all(np.all(np.asarray(u) != 0)
             for u in jax.tree.leaves(nnx.to_pure_dict(updates)["backbone"]))


def test_weight_decay_skips_biases_and_batchnorm():
  config = tiny_config(mode="full")
  config.optimizer.name, config.optimizer.momentum = "sgd", 0.0
  config.optimizer.weight_decay = 0.1
  _, params, _, tx, opt_state = make_state(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, opt_state, params)
  lr = config.optimizer.learning_rate
  for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(updates)):
    expected = -lr * 0.1 * np.asarray(p) if p.ndim >= 2 else np.zeros_like(p)
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-12)


def test_gradient_clipping_bounds_the_global_norm():
  config = tiny_config(mode="full")
  config.optimizer.name, config.optimizer.momentum = "sgd", 0.0
  config.optimizer.weight_decay, config.optimizer.grad_clip_norm = 0.0, 1.0
  _, params, _, tx, opt_state = make_state(config)
  big = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  updates, _ = tx.update(big, opt_state, params)
  norm = optax.tree.norm(updates)
  np.testing.assert_allclose(norm, config.optimizer.learning_rate * 1.0, rtol=1e-5)


def test_warmup_cosine_schedule():
  c = tiny_config()
  c.optimizer.schedule, c.optimizer.warmup_steps, c.total_steps = "cosine", 10, 110
  lr = optim.schedule(c)
  peak = c.optimizer.learning_rate
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), peak / 2, rtol=1e-5)  # Cosine midpoint.
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-9)


def test_bad_transfer_and_optimizer_settings_are_explained():
  with pytest.raises(ValueError, match="config.transfer.mode"):
    make_state(tiny_config(mode="partial"))
  with pytest.raises(ValueError, match="unfreeze_step"):
    make_state(tiny_config(mode="two_phase", unfreeze_step=99))
  c = tiny_config()
  c.optimizer.name = "lamb"
  with pytest.raises(ValueError, match="config.optimizer.name"):
    make_state(c)
  with pytest.raises(ValueError, match="neither the backbone nor the head"):
    optim.create(tiny_config(), {"encoder": {"w": jnp.zeros((2, 2))}})


# --------------------------------------------------------------------------
# SAM, EMA, learning rate for logging.
# --------------------------------------------------------------------------
A = {"backbone": {"w": np.array([1.0, 3.0, 0.5], np.float32)},
     "head": {"w": np.array([[2.0, 0.25]], np.float32)}}
B = {"backbone": {"w": np.array([0.5, -1.0, 2.0], np.float32)},
     "head": {"w": np.array([[-0.3, 1.0]], np.float32)}}
W0 = {"backbone": {"w": np.array([0.2, -0.4, 1.0], np.float32)},
      "head": {"w": np.array([[1.5, -2.0]], np.float32)}}


def quadratic(params, scale):
  """0.5 * sum(a w^2) + b . w (gradient a w + b), aux = the weights' sum."""
  terms = jax.tree.map(lambda w, a, b: scale * (0.5 * a * w * w + b * w),
                       params, A, B)
  total = sum(jnp.sum(t) for t in jax.tree.leaves(terms))
  return total, sum(jnp.sum(w) for w in jax.tree.leaves(params))


def hand_grad(w):
  return jax.tree.map(lambda w, a, b: a * w + b, w, A, B)


def sam_config(rho):
  c = tiny_config()
  c.optimizer.sam_rho = rho
  return c


def test_sam_gradient_equals_the_two_pass_hand_computation():
  rho = 0.3
  fn = jax.jit(optim.value_and_grad(quadratic, sam_config(rho)))
  (loss, aux), g_sam = fn(W0, 1.0)
  g = hand_grad(W0)
  norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
  w_adv = jax.tree.map(lambda w, gi: w + rho * gi / norm, W0, g)
  expected = hand_grad(w_adv)
  for got, want in zip(jax.tree.leaves(g_sam), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # Loss and aux from pass 1, at the real weights.
  np.testing.assert_allclose(loss, quadratic(W0, 1.0)[0], rtol=1e-6)
  np.testing.assert_allclose(aux, quadratic(W0, 1.0)[1], rtol=1e-6)
  # optax.contrib.sam in opaque mode (normalized-SGD adversary, one step)
  # makes the same outer gradient: with SGD(lr) the update is -lr * g_sam.
  lr = 0.1
  ref = optax.contrib.sam(
      optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2, opaque_mode=True)
  params = jax.tree.map(jnp.asarray, W0)
  updates, _ = ref.update(
      hand_grad(params), ref.init(params), params,
      grad_fn=lambda p, _: jax.grad(lambda q: quadratic(q, 1.0)[0])(p))
  for u, gs in zip(jax.tree.leaves(updates), jax.tree.leaves(g_sam)):
    np.testing.assert_allclose(u, -lr * gs, rtol=1e-5)


def test_sam_with_frozen_backbone_perturbs_only_the_head():
  rho = 0.3
  (_, _), g_sam = optim.value_and_grad(quadratic, sam_config(rho),
                                       train_backbone=False)(W0, 1.0)
  g = hand_grad(W0)
  head_norm = np.linalg.norm(g["head"]["w"])
  w_adv = {"backbone": W0["backbone"],
           "head": {"w": W0["head"]["w"] + rho * g["head"]["w"] / head_norm}}
  expected = hand_grad(w_adv)
  for got, want in zip(jax.tree.leaves(g_sam), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sam_rho_zero_is_the_plain_gradient_and_bad_rho_is_explained():
  (loss, aux), g = optim.value_and_grad(quadratic, sam_config(0.0))(W0, 2.0)
  (loss_ref, aux_ref), g_ref = jax.value_and_grad(quadratic, has_aux=True)(
      W0, 2.0)
  assert float(loss) == float(loss_ref) and float(aux) == float(aux_ref)
  assert bitwise_equal(g, g_ref)
  with pytest.raises(ValueError, match="config.optimizer.sam_rho"):
    optim.value_and_grad(quadratic, sam_config(-0.1))


class TinyMultitask(nnx.Module):
  """Backbone (Linear + BatchNorm) and head: the grouping of MultitaskModel."""

  def __init__(self, rngs):
    self.backbone = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs),
                                   nnx.BatchNorm(4, rngs=rngs))
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.backbone(x)))


def test_sam_on_nnx_state_keeps_pass_one_batchnorm_stats():
  graphdef, params, rest = nnx.split(TinyMultitask(nnx.Rngs(0)), nnx.Param,
                                     ...)
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)

  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest, copy=True)
    loss = jnp.mean((model(x) - y) ** 2)
    return loss, nnx.state(model, nnx.Not(nnx.Param))

  (loss0, new_rest0), g = jax.jit(optim.value_and_grad(
      loss_fn, sam_config(0.0)))(params)
  assert not bitwise_equal(new_rest0, rest)  # BatchNorm statistics moved.
  for train_backbone in (True, False):
    (loss, new_rest), g_sam = jax.jit(optim.value_and_grad(
        loss_fn, sam_config(0.05), train_backbone=train_backbone))(params)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    assert bitwise_equal(new_rest, new_rest0)  # Pass 1's statistics.
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g_sam))
    for group in ("backbone", "head"):  # The head's perturbation moves both.
      assert all_changed(pure(g_sam, group), pure(g, group))


def test_ema_update_matches_hand_computation():
  ema = {"w": np.array([1.0, 2.0], np.float32),
         "bf16": np.array([1.0], jnp.bfloat16),
         "count": np.array(3, np.int32), "key": jax.random.key(0)}
  new = {"w": np.array([3.0, -2.0], np.float32),
         "bf16": np.array([2.0], jnp.bfloat16),
         "count": np.array(4, np.int32), "key": jax.random.key(1)}
  # Without warmup: timm ModelEmaV2, d * ema + (1 - d) * new.
  out = optim.ema_update(ema, new, 0.9, 100, warmup=False)
  np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2],
                             rtol=1e-6)
  assert out["bf16"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(out["bf16"]), 1.1, rtol=1e-2)
  assert int(out["count"]) == 4 and out["count"].dtype == np.int32
  assert np.array_equal(jax.random.key_data(out["key"]),
                        jax.random.key_data(new["key"]))
  # With warmup: d = min(decay, (1 + step) / (10 + step)).
  for step, d in [(0, 0.1), (8, 0.5), (80, 0.9), (10_000, 0.999)]:
    np.testing.assert_allclose(float(optim.ema_decay(0.999, step)), d,
                               rtol=1e-6)
    out = jax.jit(optim.ema_update, static_argnums=2)(ema, new, 0.999, step)
    np.testing.assert_allclose(out["w"], d * ema["w"] + (1 - d) * new["w"],
                               rtol=1e-5)
  with pytest.raises(ValueError, match="config.ema_decay"):
    optim.ema_update(ema, new, 1.0, 0)


def test_ema_over_nnx_state():
  """Params and BatchNorm statistics (and whatever else `rest` holds) of an
  NNX model state: two steps of decay 0.5 give 0.25 w0 + 0.25 w1 + 0.5 w2."""
  _, params, rest = nnx.split(TinyMultitask(nnx.Rngs(0)), nnx.Param, ...)
  states = [{"params": params, "rest": rest}]
  for k in (1, 2):
    states.append(jax.tree.map(
        lambda v, k=k: np.asarray(v) + k * 0.5
        if jnp.issubdtype(v.dtype, jnp.floating) else v, states[0]))
  update = jax.jit(optim.ema_update, static_argnums=2,
                   static_argnames="warmup")
  ema = states[0]
  for step, new in enumerate(states[1:]):
    ema = update(ema, new, 0.5, step, warmup=False)
  for got, w0, w1, w2 in zip(*(jax.tree.leaves(t) for t in (ema, *states))):
    if jnp.issubdtype(got.dtype, jnp.floating):
      np.testing.assert_allclose(got, 0.25 * w0 + 0.25 * w1 + 0.5 * w2,
                                 rtol=1e-6)
  assert jax.tree.structure(ema) == jax.tree.structure(states[0])
  assert len(jax.tree.leaves(nnx.to_pure_dict(rest))) > 0  # BN stats present.


def test_learning_rate_for_logging():
  c = tiny_config()
  c.optimizer.schedule, c.optimizer.warmup_steps, c.total_steps = "cosine", 10, 110
  assert optim.learning_rate(c, 0) == 0.0
  assert isinstance(optim.learning_rate(c, 10), float)
  np.testing.assert_allclose(optim.learning_rate(c, 10),
                             c.optimizer.learning_rate, rtol=1e-6)
  np.testing.assert_allclose(optim.learning_rate(c, 60),
                             c.optimizer.learning_rate / 2, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(10, 110), (0, 50), (500, 300),
                                          (5, 6), (3, 3)])
def test_schedule_with_a_traced_length_is_optax_s(schedule, warmup, total):
  """A time budget passes the schedule's length into the compiled step; the
  jnp version must be optax's, step for step, past the end too."""
  c = tiny_config()
  c.optimizer.schedule, c.optimizer.warmup_steps = schedule, warmup
  c.total_steps = total
  steps = jnp.arange(total + 5)
  fixed = jax.vmap(optim.schedule(c))(steps)
  traced = jax.jit(lambda n, t: jax.vmap(optim.schedule(c, t))(n))(
      steps, jnp.int32(total))
  np.testing.assert_allclose(traced, fixed, rtol=1e-6, atol=1e-9)


def test_two_phase_with_traced_lengths_equals_fixed_ones():
  """The whole optimizer built on traced total/unfreeze steps updates as the
  one built on the config's (the state is the same structure)."""
  c = tiny_config(mode="two_phase")
  c.optimizer.schedule = "cosine"
  c.total_steps, c.transfer.unfreeze_step, c.optimizer.warmup_steps = 20, 4, 2
  params = {"backbone": {"w": jnp.ones((3, 3))}, "head": {"w": jnp.ones((3, 2))}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  fixed = optim.create(c)

  @jax.jit
  def traced_update(state, total, unfreeze):
    tx = optim.create(c, total_steps=total, unfreeze_step=unfreeze)
    return tx.update(grads, state, params)

  a = b = fixed.init(params)
  for _ in range(8):
    ua, a = fixed.update(grads, a, params)
    ub, b = traced_update(b, jnp.int32(20), jnp.int32(4))
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
