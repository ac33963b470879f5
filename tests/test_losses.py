"""Tests for affectjax.losses against a direct float64 numpy computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from affectjax import losses

C = 8


def _batch(seed, b=16, no_value_frac=0.3):
  """Random logits/targets; some VA targets are AffectNet's -2 'no value'."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, C)).astype(np.float32) * 3
  va_pred = np.tanh(rng.normal(size=(b, 2))).astype(np.float32)
  expression = rng.integers(0, C, size=b).astype(np.int32)
  valence = rng.uniform(-1, 1, size=b).astype(np.float32)
  arousal = rng.uniform(-1, 1, size=b).astype(np.float32)
  valence[rng.random(b) < no_value_frac] = -2.0
  arousal[rng.random(b) < no_value_frac] = -2.0
  return dict(logits=logits, va_pred=va_pred, expression=expression,
              valence=valence, arousal=arousal)


def _reference(d, *, vw=1.0, aw=1.0, smoothing=0.0, class_weights=None,
               mask=None):
  """The loss written out in float64 numpy, independent of optax."""
  x = d["logits"].astype(np.float64)
  b = x.shape[0]
  mask = np.ones(b) if mask is None else np.asarray(mask, np.float64)
  m = x.max(axis=1, keepdims=True)
  log_p = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
  target = np.full((b, C), smoothing / C)
  target[np.arange(b), d["expression"]] += 1.0 - smoothing
  ce = -(target * log_p).sum(axis=1)
  w = mask * (1.0 if class_weights is None
              else np.asarray(class_weights, np.float64)[d["expression"]])
  total = (w * ce).sum() / w.sum()
  for col, (name, weight) in enumerate((("valence", vw), ("arousal", aw))):
    t = d[name].astype(np.float64)
    keep = (mask > 0) & (np.abs(t) <= 1)
    if keep.any():
      err = d["va_pred"][keep, col].astype(np.float64) - t[keep]
      total += weight * np.mean(err**2)
  return total


# Jitted once per static setting: much faster on CPU than eager op dispatch.
_jit_loss = jax.jit(losses.multitask_loss, static_argnames=(
    "valence_weight", "arousal_weight", "label_smoothing"))


def _loss(d, **kw):
  return _jit_loss(
      d["logits"], d["va_pred"], expression=d["expression"],
      valence=d["valence"], arousal=d["arousal"], **kw)


def test_matches_numpy_reference_with_weights_and_smoothing():
  d = _batch(0)
  cw = np.random.default_rng(1).uniform(0.2, 3.0, size=C)
  for kw, ref_kw in [
      ({}, {}),
      ({"valence_weight": 0.5, "arousal_weight": 2.0}, {"vw": 0.5, "aw": 2.0}),
      ({"label_smoothing": 0.1}, {"smoothing": 0.1}),
      ({"class_weights": cw}, {"class_weights": cw}),
      ({"class_weights": cw, "label_smoothing": 0.2, "valence_weight": 0.3},
       {"class_weights": cw, "smoothing": 0.2, "vw": 0.3}),
  ]:
    loss, _ = _loss(d, **kw)
    np.testing.assert_allclose(float(loss), _reference(d, **ref_kw),
                               rtol=1e-5, err_msg=str(kw))


def test_no_value_targets_are_masked_and_counted():
  d = _batch(2, b=32)
  loss, stats = _loss(d)
  # Changing predictions where the target is -2 must not change anything.
  d2 = dict(d, va_pred=d["va_pred"].copy())
  d2["va_pred"][d["valence"] == -2.0, 0] = 0.9
  d2["va_pred"][d["arousal"] == -2.0, 1] = -0.7
  loss2, _ = _loss(d2)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
  assert stats["valence_count"] == np.sum(np.abs(d["valence"]) <= 1)
  assert stats["arousal_count"] == np.sum(np.abs(d["arousal"]) <= 1)
  assert 0 < stats["valence_count"] < 32  # Both cases present in the batch.
  # A NaN target is also "no value", not a NaN loss.
  d3 = dict(d, valence=np.where(d["valence"] == -2.0, np.nan,
                                d["valence"]).astype(np.float32))
  loss3, _ = _loss(d3)
  assert float(loss3) == pytest.approx(float(loss), rel=1e-6)


def test_no_valid_va_target_contributes_zero_with_finite_gradients():
  d = _batch(3)
  d["valence"][:] = -2.0
  d["arousal"][:] = np.nan
  loss, stats = _loss(d)
  ce_only = _reference(d)  # Reference skips empty VA terms.
  np.testing.assert_allclose(float(loss), ce_only, rtol=1e-5)
  assert stats["valence_count"] == 0 and stats["arousal_count"] == 0

  def f(logits, va_pred):
    return losses.multitask_loss(
        logits, va_pred, expression=d["expression"], valence=d["valence"],
        arousal=d["arousal"])[0]

  g_logits, g_va = jax.grad(f, argnums=(0, 1))(d["logits"], d["va_pred"])
  assert np.all(np.isfinite(g_logits)) and np.abs(g_logits).sum() > 0
  assert np.all(np.isfinite(g_va))
  np.testing.assert_array_equal(np.asarray(g_va), 0.0)


def test_example_mask_excludes_padding_from_every_term():
  d = _batch(4, b=10)
  real_loss, real_stats = _loss(d)
  # Pad with 6 garbage rows: huge/NaN logits, valid-looking VA targets.
  pad = _batch(5, b=6, no_value_frac=0.0)
  pad["logits"][0, 0] = np.nan
  pad["logits"][1] = 1e30
  pad["expression"][2] = 99  # Out-of-range id in a padded row.
  padded = {k: np.concatenate([d[k], pad[k]]) for k in d}
  mask = np.r_[np.ones(10), np.zeros(6)].astype(np.float32)
  loss, stats = _loss(padded, example_mask=mask)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(real_loss), rtol=1e-6)
  for k in losses.STATS_KEYS:
    np.testing.assert_allclose(float(stats[k]), float(real_stats[k]),
                               rtol=1e-6, err_msg=k)
  assert stats["count"] == 10
  # An all-padding batch is 0, not NaN.
  zero, zstats = _loss(padded, example_mask=np.zeros(16, np.float32))
  assert float(zero) == 0.0 and float(zstats["count"]) == 0.0


def test_out_of_range_label_is_excluded_from_ce_and_visible_in_counts():
  d = _batch(6, b=8)
  keep = np.ones(8, bool)
  keep[3] = False
  bad = dict(d, expression=d["expression"].copy())
  bad["expression"][3] = C  # Not a class id.
  loss, stats = _loss(bad)
  assert stats["count"] == 8 and stats["expression_count"] == 7
  ref_ce = _reference({k: v[keep] for k, v in d.items()}, vw=0.0, aw=0.0)
  np.testing.assert_allclose(
      float(stats["ce_sum"] / stats["ce_weight_sum"]), ref_ce, rtol=1e-5)
  # Also excluded when class weights are looked up by label.
  cw = np.linspace(0.5, 2.0, C)
  _, wstats = _loss(bad, class_weights=cw)
  ref_wce = _reference({k: v[keep] for k, v in d.items()}, vw=0.0, aw=0.0,
                       class_weights=cw)
  np.testing.assert_allclose(
      float(wstats["ce_sum"] / wstats["ce_weight_sum"]), ref_wce, rtol=1e-5)
  np.testing.assert_allclose(float(wstats["ce_weight_sum"]),
                             cw[d["expression"][keep]].sum(), rtol=1e-6)


def test_loss_equals_loss_from_stats_and_halves_add_up():
  d = _batch(7, b=24)
  cw = np.linspace(0.5, 2.0, C)
  kw = dict(valence_weight=0.7, arousal_weight=1.3, class_weights=cw,
            label_smoothing=0.1)
  loss, stats = _loss(d, **kw)
  lfs = dict(valence_weight=0.7, arousal_weight=1.3)
  np.testing.assert_allclose(float(loss),
                             float(losses.loss_from_stats(stats, **lfs)),
                             rtol=1e-7)
  # Uneven split: the two halves have different numbers of valid VA targets,
  # so averaging per-half losses would be wrong; summing stats is exact.
  halves = [_loss({k: v[:5] for k, v in d.items()}, **kw)[1],
            _loss({k: v[5:] for k, v in d.items()}, **kw)[1]]
  summed = losses.sum_stats(halves)
  host_loss = losses.loss_from_stats(summed, **lfs)
  assert isinstance(host_loss, float)
  np.testing.assert_allclose(host_loss, float(loss), rtol=1e-6)
  np.testing.assert_allclose(
      host_loss,
      _reference(d, vw=0.7, aw=1.3, smoothing=0.1, class_weights=cw),
      rtol=1e-5)
  # Stats summed as jax arrays (e.g. inside a jitted eval loop) agree too.
  jsum = jax.tree.map(lambda a, b: a + b, *halves)
  np.testing.assert_allclose(float(losses.loss_from_stats(jsum, **lfs)),
                             float(loss), rtol=1e-6)


def test_jit_bf16_and_sharded_batch():
  d = _batch(8, b=32)
  cw = np.linspace(2.0, 0.5, C).astype(np.float32)

  @jax.jit
  def step(logits, va_pred, expression, valence, arousal, mask):
    return losses.multitask_loss(
        logits, va_pred, expression=expression, valence=valence,
        arousal=arousal, class_weights=cw, label_smoothing=0.05,
        example_mask=mask)

  mask = np.ones(32, np.float32)
  mask[-3:] = 0
  args = (d["logits"], d["va_pred"], d["expression"], d["valence"],
          d["arousal"], mask)
  eager, _ = losses.multitask_loss(
      d["logits"], d["va_pred"], expression=d["expression"],
      valence=d["valence"], arousal=d["arousal"], class_weights=cw,
      label_smoothing=0.05, example_mask=mask)
  jitted, jstats = step(*args)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
  assert jitted.dtype == jnp.float32

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded_args = [jax.device_put(a, NamedSharding(
      mesh, P("data", *([None] * (a.ndim - 1))))) for a in args]
  sharded, sstats = step(*sharded_args)
  np.testing.assert_allclose(float(sharded), float(jitted), rtol=1e-6)
  assert float(sstats["count"]) == 29.0

  bf16, _ = step(jnp.asarray(d["logits"], jnp.bfloat16),
                 jnp.asarray(d["va_pred"], jnp.bfloat16), *args[2:])
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(float(bf16), float(jitted), rtol=2e-2)


def test_bad_shapes_raise_clear_errors():
  d = _batch(9, b=4)
  with pytest.raises(ValueError, match="va_pred"):
    losses.multitask_loss(d["logits"], d["va_pred"][:, :1],
                          expression=d["expression"], valence=d["valence"],
                          arousal=d["arousal"])
  with pytest.raises(ValueError, match="class_weights"):
    _loss(d, class_weights=np.ones(C - 1))
  with pytest.raises(ValueError, match="example_mask"):
    _loss(d, example_mask=np.ones(3))
  with pytest.raises(KeyError, match="valence_count"):
    losses.loss_from_stats({"ce_sum": 1.0})


def test_class_weights_from_counts():
  counts = np.array([74874, 134415, 25459, 14090, 6378, 3803, 24882, 3750])
  w = losses.class_weights_from_counts(counts)
  assert w.dtype == np.float32 and w.shape == (C,)
  p = counts / counts.sum()
  np.testing.assert_allclose((p * w).sum(), 1.0, rtol=1e-6)  # Mean weight 1.
  np.testing.assert_allclose(w * counts, (w * counts)[0], rtol=1e-6)  # ~1/n.
  # Weighted class mass is then uniform: each class contributes 1/C.
  np.testing.assert_allclose(p * w, 1.0 / C, rtol=1e-6)
  np.testing.assert_array_equal(
      losses.class_weights_from_counts(counts, mode="none"), np.ones(C))

  with_zero = counts.copy()
  with_zero[7] = 0
  with pytest.raises(ValueError, match=r"Classes \[7\]"):
    losses.class_weights_from_counts(with_zero)
  wz = losses.class_weights_from_counts(with_zero, zero_count_weight=0.0)
  assert wz[7] == 0.0
  pz = with_zero / with_zero.sum()
  np.testing.assert_allclose((pz * wz).sum(), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="class_weighting"):
    losses.class_weights_from_counts(counts, mode="inverse")
  with pytest.raises(ValueError, match="all zero"):
    losses.class_weights_from_counts(np.zeros(C))
