"""Tests for affectjax.losses against a direct float64 numpy computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from affectjax import losses
from affectjax import metrics

C = 8


def _ccc_from_stats(stats, name):
  """Lin's CCC from the loss's (summed) sufficient statistics, in float64:
  2 cov / (var_p + var_t + (mean_p - mean_t)^2) = 1 - MSE / (MSE + 2 cov);
  NaN without valid rows or with a zero denominator, like the metric."""
  s = {k: np.float64(jax.device_get(v)) for k, v in stats.items()}
  n = s[f"{name}_count"]
  if n == 0:
    return float("nan")
  mse = s[f"{name}_se_sum"] / n
  cov = (s[f"{name}_cross_sum"] / n
         - s[f"{name}_pred_sum"] / n * s[f"{name}_target_sum"] / n)
  den = mse + 2 * cov
  return float(1 - mse / den) if den > 0 else float("nan")

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


def _ccc(p, t):
  """Lin's CCC, population moments, two-pass, float64."""
  p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
  cov = np.mean((p - p.mean()) * (t - t.mean()))
  return 2 * cov / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)


def _reference(d, *, vw=1.0, aw=1.0, smoothing=0.0, class_weights=None,
               mask=None, mse_w=1.0, ccc_w=0.0):
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
      total += weight * (mse_w * np.mean(err**2)
                         + ccc_w * (1 - _ccc(d["va_pred"][keep, col], t[keep])))
  return total


# Jitted once per static setting: much faster on CPU than eager op dispatch.
_jit_loss = jax.jit(losses.multitask_loss, static_argnames=(
    "valence_weight", "arousal_weight", "label_smoothing", "va_mse_weight",
    "va_ccc_weight"))


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


CCC_ONLY = {"va_mse_weight": 0.0, "va_ccc_weight": 1.0}


@jax.jit
def _ccc_value_and_grad(va_pred, logits, expression, valence, arousal):
  """(loss, stats) and d loss / d va_pred for the CCC-only loss."""
  def f(va_pred):
    return losses.multitask_loss(logits, va_pred, expression=expression,
                                 valence=valence, arousal=arousal, **CCC_ONLY)
  return jax.value_and_grad(f, has_aux=True)(va_pred)


def _ccc_vg(d, va_pred=None):
  (loss, stats), grad = _ccc_value_and_grad(
      d["va_pred"] if va_pred is None else va_pred, d["logits"],
      d["expression"], d["valence"], d["arousal"])
  return float(loss), stats, np.asarray(grad)


def test_ccc_loss_alone_and_mixed_matches_numpy():
  d = _batch(10, b=32)
  mixed = {"va_mse_weight": 0.5, "va_ccc_weight": 2.0, "valence_weight": 0.7,
           "arousal_weight": 1.5}
  for kw, ref_kw in [
      (CCC_ONLY, {"mse_w": 0.0, "ccc_w": 1.0}),
      (mixed, {"mse_w": 0.5, "ccc_w": 2.0, "vw": 0.7, "aw": 1.5}),
  ]:
    loss, stats = _loss(d, **kw)
    np.testing.assert_allclose(float(loss), _reference(d, **ref_kw),
                               rtol=1e-5, err_msg=str(kw))
    np.testing.assert_allclose(float(losses.loss_from_stats(stats, **kw)),
                               float(loss), rtol=1e-6)
  # CCC itself, against the project's evaluation metric (masking included).
  for col, name in enumerate(("valence", "arousal")):
    ref = metrics.regression_metrics(d[name], d["va_pred"][:, col])["ccc"]
    np.testing.assert_allclose(float(_ccc_from_stats(stats, name)), ref,
                               rtol=1e-5)
    np.testing.assert_allclose(
        _ccc_from_stats(losses.sum_stats([stats]), name), ref, rtol=1e-5)


def test_ccc_masks_rows_without_a_value_and_sums_exactly_over_batches():
  d = _batch(11, b=32, no_value_frac=0.3)
  d["arousal"][:3] = np.nan
  loss, stats = _loss(d, **CCC_ONLY)
  np.testing.assert_allclose(float(loss), _reference(d, mse_w=0.0, ccc_w=1.0),
                             rtol=1e-5)
  d2 = dict(d, va_pred=d["va_pred"].copy())
  d2["va_pred"][np.abs(d["valence"]) > 1, 0] = 0.99
  d2["va_pred"][~(np.abs(d["arousal"]) <= 1), 1] = -0.99
  assert float(_loss(d2, **CCC_ONLY)[0]) == pytest.approx(float(loss), rel=1e-6)
  # Padding rows (mask 0) are ignored too, even with valid-looking targets.
  pad = _batch(12, b=8, no_value_frac=0.0)
  padded = {k: np.concatenate([d[k], pad[k]]) for k in d}
  mask = np.r_[np.ones(32), np.zeros(8)].astype(np.float32)
  np.testing.assert_allclose(
      float(_loss(padded, example_mask=mask, **CCC_ONLY)[0]), float(loss),
      rtol=1e-6)
  # CCC is not a mean of per-batch CCCs, but the summed stats give the CCC
  # of the whole set: four pieces (each with its own number of valid rows)
  # recover the full-batch loss.
  pieces = [_loss({k: v[i:i + 8] for k, v in d.items()}, **CCC_ONLY)[1]
            for i in range(0, 32, 8)]
  assert len({float(p["valence_count"]) for p in pieces}) > 1
  np.testing.assert_allclose(
      losses.loss_from_stats(losses.sum_stats(pieces), **CCC_ONLY),
      float(loss), rtol=1e-5)


def test_ccc_gradient_points_toward_the_targets():
  d = _batch(13, b=32, no_value_frac=0.2)
  valid = np.abs(np.stack([d["valence"], d["arousal"]], 1)) <= 1
  targets = np.where(valid, np.stack([d["valence"], d["arousal"]], 1), 0.0)
  base, _, grad = _ccc_vg(d)
  assert np.all(np.isfinite(grad)) and np.all(grad[~valid] == 0)
  closer = (d["va_pred"] + 0.3 * (targets - d["va_pred"]) * valid)
  assert _ccc_vg(d, closer.astype(np.float32))[0] < base
  assert _ccc_vg(d, d["va_pred"] - 0.05 * grad)[0] < base
  # Perfect predictions: CCC 1, the CCC part of the loss is 0.
  perfect = np.where(valid, targets, d["va_pred"]).astype(np.float32)
  np.testing.assert_allclose(_ccc_vg(d, perfect)[0],
                             _reference(d, mse_w=0.0), rtol=1e-5)


def test_ccc_without_enough_valid_rows_is_finite():
  d = _batch(14, b=32)
  d["valence"][:] = -2.0  # No valid row: the term is 0.
  d["arousal"][1:] = -2.0  # One valid row: variance 0, CCC 0, 1 - CCC = 1.
  d["arousal"][0] = 0.5
  loss, stats, grad = _ccc_vg(d)
  np.testing.assert_allclose(loss, _reference(d, mse_w=0.0) + 1.0, rtol=1e-5)
  assert np.all(np.isfinite(grad))
  summed = losses.sum_stats([stats])
  assert np.isnan(_ccc_from_stats(summed, "valence"))
  assert _ccc_from_stats(summed, "arousal") == 0.0


def test_correct_sum_counts_top1_hits_on_real_labelled_rows():
  d = _batch(15, b=32)
  mask = np.ones(32, np.float32)
  mask[-4:] = 0
  d["expression"][0] = C  # Not a class id: never counted.
  d["logits"][1] = 0.0
  d["logits"][1, d["expression"][1]] = 5.0  # A sure hit.
  _, stats = _loss(d, example_mask=mask)
  hits = (d["logits"].argmax(1) == d["expression"]) & (mask > 0)
  assert float(stats["correct_sum"]) == hits.sum() >= 1
  assert float(stats["expression_count"]) == 27
