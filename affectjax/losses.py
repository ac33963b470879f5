"""Multitask training loss: expression cross-entropy + valence/arousal MSE and/or CCC.

Everything here is a pure `jnp` function with keyword-only targets, so the
trainer can call it inside a jitted step over a batch sharded on the 1-D
("data",) mesh; XLA turns the batch sums into cross-device reductions.

The loss is built from SUMS and COUNTS (scenic's (sum, normalizer) pairs),
returned as `stats`. Summing `stats` over evaluation batches (padded or not)
and calling `loss_from_stats` gives exactly the loss over the whole set, which a
mean of per-batch means would not (batches differ in how many valid
valence/arousal targets and how much class weight they hold).

Normalization, term by term:
  * Cross-entropy: each example i has weight w_i = mask_i * class_weight[y_i]
    (class_weight = 1 without class weighting). The CE term is
    sum_i w_i * ce_i / sum_i w_i -- a weighted mean, so class weighting changes
    the balance between classes but not the overall scale of the term.
  * Valence (and, separately, arousal): mean squared error over the examples
    whose target lies in [-1, 1] (and are real, mask_i = 1). AffectNet writes
    -2 for "no value"; such targets, and NaNs, are masked out.
  * Valence/arousal may also (or instead) use 1 - CCC (Lin's concordance
    correlation), as HSEmotion trains its multitask models: each of valence and
    arousal contributes va_mse_weight * MSE + va_ccc_weight * (1 - CCC), then
    times valence_weight / arousal_weight. CCC uses population moments over
    the valid rows of the (global) batch, the formula of
    `affectjax.metrics.regression_metrics`. It is not a mean over examples,
    but it is a function of sums (of p, t, p^2, t^2, p*t and the count), so
    the stats stay additive: a training step's CCC is the whole global batch's
    (XLA reduces the sums across devices), and the evaluation loss from summed
    stats is exactly 1 - CCC over the whole split.
  * A term with nothing to normalize by (no valid target, or an all-padding
    batch) contributes 0, never NaN, and has zero gradient. The CCC term is
    also 0 when its denominator var_p + var_t + (mean_p - mean_t)^2 is 0,
    which happens only when every prediction equals every target (CCC
    undefined, but perfect agreement).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Stats keys, all float32 scalars (sums, or counts stored as floats so that the
# whole dict can be added with one tree_map).
STATS_KEYS = (
    "count",  # Real (unpadded) examples.
    "expression_count",  # Real examples whose label is a valid class id.
    "ce_sum",  # sum_i w_i * cross_entropy_i.
    "ce_weight_sum",  # sum_i w_i (== expression_count without class weights).
    "correct_sum",  # Real examples with argmax(logits) == label.
    "valence_se_sum",
    "valence_count",
    "arousal_se_sum",
    "arousal_count",
    # For CCC, per target t in (valence, arousal), over the same valid rows:
    "valence_pred_sum",  # sum p
    "valence_target_sum",  # sum t
    "valence_pred_sq_sum",  # sum p^2
    "valence_target_sq_sum",  # sum t^2
    "valence_cross_sum",  # sum p * t
    "arousal_pred_sum",
    "arousal_target_sum",
    "arousal_pred_sq_sum",
    "arousal_target_sq_sum",
    "arousal_cross_sum",
)
VA_TARGETS = ("valence", "arousal")


def _safe_mean(total, count):
  """total / count, and 0 where count == 0 (no NaN value, no NaN gradient)."""
  nonzero = count > 0
  return jnp.where(nonzero, total / jnp.where(nonzero, count, 1.0), 0.0)


def _masked_va_sums(name, pred, target, mask) -> dict:
  """The sums over entries with a valid target, as `{name}_*` stats.

  Valid means: mask == 1 and target in [-1, 1] (NaN compares False, so NaN
  targets are invalid too). Invalid targets and their predictions are
  replaced by 0 *before* any arithmetic; multiplying a NaN error by a zero
  mask would still give NaN, and `where` on the finished error would still
  leak NaN into the gradient.
  """
  valid = mask * ((target >= -1.0) & (target <= 1.0)).astype(jnp.float32)
  keep = valid > 0
  t = jnp.where(keep, target, 0.0)
  p = jnp.where(keep, pred, 0.0)
  return {
      f"{name}_se_sum": jnp.sum(jnp.square(p - t)),
      f"{name}_count": jnp.sum(valid),
      f"{name}_pred_sum": jnp.sum(p),
      f"{name}_target_sum": jnp.sum(t),
      f"{name}_pred_sq_sum": jnp.sum(p * p),
      f"{name}_target_sq_sum": jnp.sum(t * t),
      f"{name}_cross_sum": jnp.sum(p * t),
  }


def multitask_loss(
    logits,
    va_pred,
    *,
    expression,
    valence,
    arousal,
    valence_weight: float = 1.0,
    arousal_weight: float = 1.0,
    va_mse_weight: float = 1.0,
    va_ccc_weight: float = 0.0,
    label_smoothing: float = 0.0,
    class_weights=None,
    example_mask=None,
):
  """Expression CE + weighted valence/arousal MSE and/or 1 - CCC for one batch.

  Args:
    logits: [B, C] expression logits; any float dtype (bf16 is upcast: the
      softmax and all sums run in float32).
    va_pred: [B, 2] predicted (valence, arousal).
    expression: [B] int class ids. Ids outside [0, C) are excluded from the CE
      term; this shows up as `stats['expression_count'] < stats['count']` so
      the caller can tell (the data pipeline never produces them).
    valence: [B] float targets; values outside [-1, 1] (AffectNet's -2 "no
      value", NaN) are excluded from the valence term.
    arousal: [B] float targets, same rule.
    valence_weight: multiplier of the valence term.
    arousal_weight: multiplier of the arousal term.
    va_mse_weight: weight of the MSE inside each valence/arousal term
      (`config.loss.va_mse_weight`).
    va_ccc_weight: weight of 1 - CCC inside each valence/arousal term
      (`config.loss.va_ccc_weight`); CCC over the valid rows of the batch.
    label_smoothing: alpha; the CE target is (1 - alpha) * one_hot + alpha / C.
    class_weights: optional [C] per-class weights (see
      `class_weights_from_counts`); an example is weighted by its TRUE class.
    example_mask: optional [B] 1 for real examples, 0 for padding; padding is
      excluded from every term and every count.

  Returns:
    (loss, stats): float32 scalar loss, and a dict of float32 scalar sums and
    counts (`STATS_KEYS`). `loss == loss_from_stats(stats, valence_weight=...,
    arousal_weight=..., va_mse_weight=..., va_ccc_weight=...)`.
    `stats['correct_sum'] / stats['expression_count']` is the top-1 accuracy.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  va_pred = jnp.asarray(va_pred).astype(jnp.float32)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [B, C], got shape {logits.shape}.")
  batch, num_classes = logits.shape
  if va_pred.shape != (batch, 2):
    raise ValueError(
        f"va_pred must be [B, 2] = {(batch, 2)} (valence, arousal), got"
        f" {va_pred.shape}.")
  expression = jnp.asarray(expression).astype(jnp.int32)
  valence = jnp.asarray(valence).astype(jnp.float32)
  arousal = jnp.asarray(arousal).astype(jnp.float32)
  for name, arr in (("expression", expression), ("valence", valence),
                    ("arousal", arousal)):
    if arr.shape != (batch,):
      raise ValueError(f"{name} must have shape {(batch,)}, got {arr.shape}.")
  if example_mask is None:
    mask = jnp.ones((batch,), jnp.float32)
  else:
    mask = jnp.asarray(example_mask).astype(jnp.float32)
    if mask.shape != (batch,):
      raise ValueError(
          f"example_mask must have shape {(batch,)}, got {mask.shape}.")

  # --- Expression: weighted, label-smoothed softmax cross-entropy. ---
  label_ok = (expression >= 0) & (expression < num_classes)
  expr_mask = mask * label_ok.astype(jnp.float32)
  # one_hot of an out-of-range id is all zeros; its CE is masked out anyway.
  targets = jax.nn.one_hot(expression, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  ce = optax.softmax_cross_entropy(logits, targets)
  if class_weights is None:
    weights = expr_mask
  else:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(
          f"class_weights must have shape {(num_classes,)} (one per class),"
          f" got {class_weights.shape}.")
    safe_ids = jnp.where(label_ok, expression, 0)
    weights = expr_mask * class_weights[safe_ids]
  # `where`, not a product: padded rows may hold inf/NaN logits.
  ce_sum = jnp.sum(jnp.where(weights > 0, weights * ce, 0.0))
  correct = (jnp.argmax(logits, axis=-1) == expression).astype(jnp.float32)

  stats = {
      "count": jnp.sum(mask),
      "expression_count": jnp.sum(expr_mask),
      "ce_sum": ce_sum,
      "ce_weight_sum": jnp.sum(weights),
      "correct_sum": jnp.sum(correct * expr_mask),
      # --- Valence / arousal: masked sums for MSE and CCC. ---
      **_masked_va_sums("valence", va_pred[:, 0], valence, mask),
      **_masked_va_sums("arousal", va_pred[:, 1], arousal, mask),
  }
  loss = loss_from_stats(
      stats, valence_weight=valence_weight, arousal_weight=arousal_weight,
      va_mse_weight=va_mse_weight, va_ccc_weight=va_ccc_weight)
  return loss, stats


def term_weights(config) -> dict[str, float]:
  """``config.loss``'s term weights, as keywords of `multitask_loss` and
  `loss_from_stats` (one place, so training and evaluation weigh alike)."""
  loss = config.loss
  return {"valence_weight": float(loss.valence_weight),
          "arousal_weight": float(loss.arousal_weight),
          "va_mse_weight": float(loss.va_mse_weight),
          "va_ccc_weight": float(loss.va_ccc_weight)}


def config_loss_kwargs(config, batch: Mapping, class_weights=None) -> dict:
  """`multitask_loss` keywords for a batch under ``config.loss``."""
  return dict(expression=batch["expression"], valence=batch["valence"],
              arousal=batch["arousal"], **term_weights(config),
              label_smoothing=float(config.loss.label_smoothing),
              class_weights=class_weights)


def loss_from_stats(stats: Mapping, *, valence_weight: float = 1.0,
                    arousal_weight: float = 1.0, va_mse_weight: float = 1.0,
                    va_ccc_weight: float = 0.0):
  """The multitask loss recovered from (possibly summed) `stats`.

  Works on a single batch's stats inside jit (returns a jnp scalar) and on
  stats accumulated over many batches on the host. For host-side numpy/Python
  values the arithmetic runs in float64 numpy and returns a Python float.
  """
  missing = [k for k in STATS_KEYS if k not in stats]
  if missing:
    raise KeyError(f"stats is missing {missing}; expected keys {STATS_KEYS}.")
  on_host = not any(isinstance(stats[k], jax.Array) for k in STATS_KEYS)
  if on_host:
    s = {k: np.float64(stats[k]) for k in STATS_KEYS}

    def mean(total, count):
      return float(total / count) if count > 0 else 0.0

  else:
    s = stats
    mean = _safe_mean
  loss = mean(s["ce_sum"], s["ce_weight_sum"])
  for name, weight in (("valence", valence_weight),
                       ("arousal", arousal_weight)):
    term = 0.0
    if va_mse_weight:
      term = term + va_mse_weight * mean(s[f"{name}_se_sum"],
                                         s[f"{name}_count"])
    if va_ccc_weight:
      term = term + va_ccc_weight * _one_minus_ccc(s, name, on_host)
    loss = loss + weight * term
  return float(loss) if on_host else loss


def _ccc_parts(s, name, on_host):
  """(mse, den, defined) of `name` from the sums: den = MSE + 2 cov.

  var_p + var_t + (mean_p - mean_t)^2 = MSE + 2 cov, so CCC = 1 - MSE / den,
  and the numerator MSE comes from the directly summed squared error (no
  cancellation); only cov uses raw moments.
  """
  n = s[f"{name}_count"]
  safe_n = (n if n > 0 else 1.0) if on_host else jnp.where(n > 0, n, 1.0)
  mse = s[f"{name}_se_sum"] / safe_n
  cov = (s[f"{name}_cross_sum"] / safe_n
         - (s[f"{name}_pred_sum"] / safe_n) * (s[f"{name}_target_sum"] / safe_n))
  den = mse + 2.0 * cov
  return mse, den, (n > 0) & (den > 0)


def _one_minus_ccc(s, name, on_host):
  """1 - CCC; 0 without valid rows or with a zero denominator (module doc)."""
  mse, den, defined = _ccc_parts(s, name, on_host)
  if on_host:
    return float(mse / den) if defined else 0.0
  return jnp.where(defined, mse / jnp.where(defined, den, 1.0), 0.0)


def sum_stats(stats_list: Sequence[Mapping]) -> dict[str, float]:
  """Adds per-batch `stats` on the host in float64 (exact for counts < 2**53).

  Use this for evaluation: device float32 sums are exact per batch for counts,
  but accumulating thousands of batches in float32 would round.
  """
  if not stats_list:
    raise ValueError("sum_stats needs at least one stats dict.")
  return {k: float(sum(np.float64(jax.device_get(s[k])) for s in stats_list))
          for k in STATS_KEYS}


def class_weights_from_counts(class_counts, *, mode: str = "inverse_frequency",
                              zero_count_weight: float | None = None
                              ) -> np.ndarray:
  """Per-class CE weights from the training class histogram.

  'inverse_frequency': w_c = N / (K * n_c), with N the total count and K the
  number of classes with n_c > 0. This is proportional to 1 / n_c and averages
  to exactly 1 under the training distribution (sum_c n_c/N * w_c = 1), so the
  CE term keeps its scale and the learning rate needs no retuning.
  'none': all ones.

  A class with zero training examples has no finite inverse frequency. By
  default that is an error (it usually means the wrong split or a broken
  manifest). Pass `zero_count_weight` to give such classes that weight instead;
  they carry no training mass, so the normalization above is unchanged and the
  weight only matters for evaluation-loss examples of that class.

  Returns:
    float32 array [C].
  """
  counts = np.asarray(class_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(
        f"class_counts must be a non-empty 1-D list (index = class id), got"
        f" shape {counts.shape}; read it from manifest.json"
        f" splits.train.class_counts.")
  if not np.all(np.isfinite(counts)) or np.any(counts < 0):
    raise ValueError(f"class_counts must be finite and >= 0, got {counts}.")
  counts = counts.astype(np.float64)
  if mode == "none":
    return np.ones(counts.shape, np.float32)
  if mode != "inverse_frequency":
    raise ValueError(
        f"Unknown class weighting mode {mode!r}; use 'none' or"
        f" 'inverse_frequency' (config.loss.class_weighting).")
  present = counts > 0
  if not present.any():
    raise ValueError("class_counts are all zero: the training split is empty.")
  if not present.all() and zero_count_weight is None:
    raise ValueError(
        f"Classes {np.flatnonzero(~present).tolist()} have zero training"
        f" examples (class_counts={counts.astype(int).tolist()}), so their"
        f" inverse frequency is infinite. Check the data, set"
        f" config.loss.class_weighting='none', or pass zero_count_weight.")
  weights = np.full(counts.shape, np.nan)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  if zero_count_weight is not None:
    weights[~present] = zero_count_weight
  return weights.astype(np.float32)
