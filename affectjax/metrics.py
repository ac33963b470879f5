"""Host-side (numpy, float64) evaluation metrics over a whole validation set.

Expression classification: accuracy, macro-F1, per-class F1/precision/recall
and the confusion matrix. Valence and arousal, each: RMSE, Pearson correlation
(PCC), Lin's concordance correlation (CCC) and sign agreement (SAGR).

These are computed once over the full set of predictions, not averaged over
batches: F1, PCC and CCC are not means of per-example quantities, so batch
averages would be wrong. `EvalAccumulator` collects batches (dropping padded
rows) and calls `evaluate` at the end.

Conventions (the ones a reader could otherwise guess wrong):
  * Confusion matrix: rows = true class, columns = predicted class.
  * Per-class F1 = 2 TP / (2 TP + FP + FN). A class that is neither present in
    the targets nor ever predicted has F1 = 0/0: it is reported as NaN and left
    out of the macro mean (the same as scikit-learn's `f1_score(...,
    average='macro')` without `labels=`, which averages over the classes that
    occur in either array). Per-class recall of a class with no true examples
    and precision of a never-predicted class are NaN for the same reason.
  * Regression metrics use only entries whose TARGET is in [-1, 1]; AffectNet's
    -2 ("no value") and NaN targets are excluded. If none remain, every
    regression metric is float('nan'). Predictions are not filtered: a NaN
    prediction yields NaN metrics, which is what should be seen.
  * PCC is NaN when targets or predictions are constant (zero variance). CCC
    uses population (1/N) moments and is NaN only when its denominator
    var_x + var_y + (mean_x - mean_y)^2 is 0 (both constant and equal).
  * SAGR = mean(np.sign(target) == np.sign(pred)): 0 is its own sign, so a 0
    target agrees only with a 0 prediction (as in the AffectNet papers).
  * NaN is a float: `json.dumps` would write the non-standard token `NaN`.
    Write results through `affectjax.fileio` (its `to_json_compatible` turns
    NaN/inf into None).
"""
from __future__ import annotations

import math

import numpy as np

REGRESSION_METRICS = ("rmse", "pcc", "ccc", "sagr")
TARGETS = ("valence", "arousal")


def predicted_classes(logits_or_pred, num_classes: int) -> np.ndarray:
  """Class ids [N] from logits [N, C] (argmax) or from ids [N] as given."""
  arr = np.asarray(logits_or_pred)
  if arr.ndim == 2:
    if arr.shape[1] != num_classes:
      raise ValueError(
          f"logits_or_pred has {arr.shape[1]} columns but num_classes is"
          f" {num_classes}.")
    return np.argmax(arr, axis=1)
  if arr.ndim == 1:
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(
          f"logits_or_pred is 1-D with dtype {arr.dtype}; pass integer class"
          f" ids [N] or logits [N, C].")
    return arr.astype(np.int64)
  raise ValueError(
      f"logits_or_pred must be logits [N, C] or class ids [N], got shape"
      f" {arr.shape}.")


def _check_class_ids(name: str, ids: np.ndarray, num_classes: int) -> None:
  bad = np.flatnonzero((ids < 0) | (ids >= num_classes))
  if bad.size:
    raise ValueError(
        f"{name} has {bad.size} value(s) outside [0, {num_classes}), first at"
        f" index {bad[0]} (value {ids[bad[0]]}); remove or relabel them"
        f" before evaluating.")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
  """[C, C] int64 counts; rows = true class, columns = predicted class."""
  y_true = np.asarray(y_true).astype(np.int64)
  y_pred = np.asarray(y_pred).astype(np.int64)
  if y_true.shape != y_pred.shape or y_true.ndim != 1:
    raise ValueError(
        f"y_true and y_pred must both be [N], got {y_true.shape} and"
        f" {y_pred.shape}.")
  _check_class_ids("y_true (expression)", y_true, num_classes)
  _check_class_ids("y_pred (predicted class)", y_pred, num_classes)
  flat = y_true * num_classes + y_pred
  return np.bincount(flat, minlength=num_classes**2).reshape(
      num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den elementwise, NaN where den == 0 (undefined, see module doc)."""
  num = num.astype(np.float64)
  out = np.full(num.shape, np.nan)
  np.divide(num, den, out=out, where=den > 0)
  return out


def classification_metrics(cm: np.ndarray) -> dict:
  """Accuracy, macro-F1 and per-class F1/precision/recall from a confusion matrix."""
  cm = np.asarray(cm)
  total = cm.sum()
  if total == 0:
    raise ValueError("Cannot compute classification metrics of zero examples.")
  tp = np.diag(cm)
  support = cm.sum(axis=1)  # True examples per class.
  predicted = cm.sum(axis=0)  # Predictions per class.
  # 2TP + FP + FN == support + predicted; 0 only if the class never occurs.
  f1 = _ratio(2 * tp, support + predicted)
  return {
      "accuracy": float(tp.sum() / total),
      "macro_f1": float(np.nanmean(f1)),  # At least one class occurs.
      "per_class_f1": f1,
      "per_class_precision": _ratio(tp, predicted),
      "per_class_recall": _ratio(tp, support),
  }


def valid_target_mask(target) -> np.ndarray:
  """True where the regression target is a real value in [-1, 1]."""
  target = np.asarray(target, np.float64)
  return (target >= -1.0) & (target <= 1.0)  # NaN compares False.


def regression_metrics(target, pred) -> dict:
  """RMSE, PCC, CCC, SAGR over entries with a valid target (see module doc).

  Returns floats, float('nan') where undefined, plus 'count' (valid entries).
  """
  target = np.asarray(target, np.float64)
  pred = np.asarray(pred, np.float64)
  if target.shape != pred.shape or target.ndim != 1:
    raise ValueError(
        f"target and pred must both be [N], got {target.shape} and"
        f" {pred.shape}.")
  keep = valid_target_mask(target)
  y, p = target[keep], pred[keep]
  n = int(keep.sum())
  if n == 0:
    return {"rmse": math.nan, "pcc": math.nan, "ccc": math.nan,
            "sagr": math.nan, "count": 0}
  # Two-pass (centered) moments: stable when means are large relative to
  # spreads, unlike E[xy] - E[x]E[y].
  mean_y, mean_p = y.mean(), p.mean()
  dy, dp = y - mean_y, p - mean_p
  var_y, var_p = np.mean(dy * dy), np.mean(dp * dp)
  cov = np.mean(dy * dp)
  pcc_den = math.sqrt(var_y * var_p)
  ccc_den = var_y + var_p + (mean_y - mean_p) ** 2
  return {
      "rmse": float(np.sqrt(np.mean((p - y) ** 2))),
      "pcc": float(cov / pcc_den) if pcc_den > 0 else math.nan,
      "ccc": float(2.0 * cov / ccc_den) if ccc_den > 0 else math.nan,
      "sagr": float(np.mean(np.sign(y) == np.sign(p))),
      "count": n,
  }


def evaluate(*, expression, logits_or_pred, valence, arousal, va_pred,
             num_classes: int) -> dict:
  """All validation metrics over the whole set, as JSON-ready Python types.

  Args:
    expression: [N] true class ids in [0, num_classes).
    logits_or_pred: logits [N, C] (argmax is taken) or predicted ids [N].
    valence: [N] targets; entries outside [-1, 1] are excluded.
    arousal: [N] targets; same rule.
    va_pred: [N, 2] predicted (valence, arousal).
    num_classes: C.

  Returns:
    dict with 'accuracy', 'macro_f1', 'confusion_matrix' (list of lists of
    int), 'per_class_f1', 'per_class_precision', 'per_class_recall' (lists of
    float, NaN where undefined), 'num_examples', and for t in (valence,
    arousal): f'{t}_rmse', f'{t}_pcc', f'{t}_ccc', f'{t}_sagr' (float, NaN if
    no valid target) and f'{t}_count' (int).
  """
  expression = np.asarray(expression)
  n = expression.shape[0] if expression.ndim == 1 else -1
  if n < 1:
    raise ValueError(
        f"expression must be a non-empty [N] array, got shape"
        f" {expression.shape}.")
  pred = predicted_classes(logits_or_pred, num_classes)
  va_pred = np.asarray(va_pred)
  for name, arr, shape in (("logits_or_pred", pred, (n,)),
                           ("valence", np.asarray(valence), (n,)),
                           ("arousal", np.asarray(arousal), (n,)),
                           ("va_pred", va_pred, (n, 2))):
    if arr.shape != shape:
      raise ValueError(
          f"{name} must have shape {shape} to match expression, got"
          f" {arr.shape}.")
  cm = confusion_matrix(expression, pred, num_classes)
  cls = classification_metrics(cm)
  out = {
      "num_examples": n,
      "accuracy": cls["accuracy"],
      "macro_f1": cls["macro_f1"],
      "confusion_matrix": cm.tolist(),
      "per_class_f1": cls["per_class_f1"].tolist(),
      "per_class_precision": cls["per_class_precision"].tolist(),
      "per_class_recall": cls["per_class_recall"].tolist(),
  }
  for col, (name, target) in enumerate(zip(TARGETS, (valence, arousal))):
    reg = regression_metrics(target, va_pred[:, col])
    for key in REGRESSION_METRICS:
      out[f"{name}_{key}"] = reg[key]
    out[f"{name}_count"] = reg["count"]
  return out


class EvalAccumulator:
  """Collects evaluation batches on the host, then computes `evaluate` once.

  Keeps predicted class ids (not logits) and the raw targets of real examples;
  rows with example_mask == 0 are padding and are dropped here, so every real
  example counts exactly once. Memory is O(N) small numbers (AffectNet val:
  ~4k rows).
  """

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self._parts = {k: [] for k in ("expression", "pred", "valence", "arousal",
                                   "va_pred")}

  def update(self, *, expression, logits_or_pred, valence, arousal, va_pred,
             example_mask=None) -> None:
    """Adds one batch; arrays may be jax arrays (they are copied to host)."""
    expression = np.asarray(expression)
    if expression.ndim != 1:
      raise ValueError(f"expression must be [B], got {expression.shape}.")
    pred = predicted_classes(logits_or_pred, self.num_classes)
    batch = {"expression": expression, "pred": pred,
             "valence": np.asarray(valence), "arousal": np.asarray(arousal),
             "va_pred": np.asarray(va_pred)}
    for name, arr in batch.items():
      if arr.shape[:1] != expression.shape:
        raise ValueError(
            f"{name} has {arr.shape[:1]} rows but expression has"
            f" {expression.shape[0]}.")
    if example_mask is not None:
      keep = np.asarray(example_mask).astype(bool)
      if keep.shape != expression.shape:
        raise ValueError(
            f"example_mask must have shape {expression.shape}, got"
            f" {keep.shape}.")
      batch = {k: v[keep] for k, v in batch.items()}
    for name, arr in batch.items():
      self._parts[name].append(arr)

  def result(self) -> dict:
    """`evaluate` over every real example added so far."""
    if not self._parts["expression"]:
      raise ValueError("EvalAccumulator.result() called before any update().")
    full = {k: np.concatenate(v) for k, v in self._parts.items()}
    return evaluate(expression=full["expression"], logits_or_pred=full["pred"],
                    valence=full["valence"], arousal=full["arousal"],
                    va_pred=full["va_pred"], num_classes=self.num_classes)
