"""Tests for affectjax.metrics against scikit-learn and plain numpy formulas."""
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from affectjax import fileio
from affectjax import metrics

C = 8


def _ref_pcc(y, p):
  return np.corrcoef(y, p)[0, 1]


def _ref_ccc(y, p):
  """Lin's CCC written from the definition, population moments."""
  mx, my = p.mean(), y.mean()
  cov = ((p - mx) * (y - my)).sum() / len(y)
  return 2 * cov / (p.var() + y.var() + (mx - my) ** 2)


def _ref_sagr(y, p):
  agree = [(a > 0 and b > 0) or (a < 0 and b < 0) or (a == 0 and b == 0)
           for a, b in zip(y, p)]
  return np.mean(agree)


def _random_set(seed, n=200, absent=(6,)):
  """Random predictions; classes in `absent` are neither true nor predicted."""
  rng = np.random.default_rng(seed)
  allowed = np.array([c for c in range(C) if c not in absent])
  y = rng.choice(allowed, size=n)
  # Correct 60% of the time, else a random allowed class.
  pred = np.where(rng.random(n) < 0.6, y, rng.choice(allowed, size=n))
  logits = rng.normal(size=(n, C))
  logits[np.arange(n), pred] += 20.0  # argmax == pred.
  logits[:, list(absent)] -= 50.0
  v = rng.uniform(-1, 1, n)
  a = rng.uniform(-1, 1, n)
  va_pred = np.stack([0.7 * v + 0.3 * rng.normal(size=n) + 0.1,
                      0.5 * a + 0.4 * rng.normal(size=n)], axis=1)
  v[rng.random(n) < 0.2] = -2.0  # AffectNet "no value".
  return dict(expression=y, logits=logits, pred=pred, valence=v, arousal=a,
              va_pred=va_pred)


def test_classification_matches_sklearn():
  d = _random_set(0)
  out = metrics.evaluate(expression=d["expression"], logits_or_pred=d["logits"],
                         valence=d["valence"], arousal=d["arousal"],
                         va_pred=d["va_pred"], num_classes=C)
  y, p = d["expression"], d["pred"]
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
  np.testing.assert_array_equal(
      out["confusion_matrix"], skm.confusion_matrix(y, p, labels=range(C)))
  # Class 6 never occurs: excluded from the macro mean, like sklearn without
  # `labels=` (which averages over the classes present in y or p).
  assert out["macro_f1"] == pytest.approx(
      skm.f1_score(y, p, average="macro"), rel=1e-12)
  present = [c for c in range(C) if c != 6]
  np.testing.assert_allclose(
      np.array(out["per_class_f1"])[present],
      skm.f1_score(y, p, labels=present, average=None), rtol=1e-12)
  np.testing.assert_allclose(
      np.array(out["per_class_recall"])[present],
      skm.recall_score(y, p, labels=present, average=None), rtol=1e-12)
  np.testing.assert_allclose(
      np.array(out["per_class_precision"])[present],
      skm.precision_score(y, p, labels=present, average=None), rtol=1e-12)
  assert math.isnan(out["per_class_f1"][6])
  assert math.isnan(out["per_class_recall"][6])
  assert isinstance(out["confusion_matrix"][0][0], int)
  # Logits and class ids give the same result.
  out_ids = metrics.evaluate(expression=y, logits_or_pred=p,
                             valence=d["valence"], arousal=d["arousal"],
                             va_pred=d["va_pred"], num_classes=C)
  assert json.dumps(fileio.to_json_compatible(out_ids)) == json.dumps(
      fileio.to_json_compatible(out))


def test_f1_edge_cases_present_but_never_predicted_and_predicted_but_absent():
  y = np.array([0, 0, 1, 1, 2])
  p = np.array([0, 0, 1, 3, 1])  # 2 never predicted (F1 0); 3 never true (0).
  cls = metrics.classification_metrics(metrics.confusion_matrix(y, p, 5))
  f1 = cls["per_class_f1"]
  assert f1[2] == 0.0 and f1[3] == 0.0 and math.isnan(f1[4])
  assert math.isnan(cls["per_class_precision"][2])  # Never predicted.
  assert math.isnan(cls["per_class_recall"][3])  # Never true.
  assert cls["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
  assert cls["macro_f1"] == pytest.approx(np.mean([1.0, 0.5, 0.0, 0.0]))


def test_regression_matches_numpy_formulas_and_excludes_no_value():
  d = _random_set(1)
  out = metrics.evaluate(expression=d["expression"], logits_or_pred=d["pred"],
                         valence=d["valence"], arousal=d["arousal"],
                         va_pred=d["va_pred"], num_classes=C)
  for col, name in enumerate(("valence", "arousal")):
    keep = np.abs(d[name]) <= 1
    y, p = d[name][keep], d["va_pred"][keep, col]
    assert out[f"{name}_count"] == keep.sum()
    assert out[f"{name}_rmse"] == pytest.approx(
        np.sqrt(skm.mean_squared_error(y, p)), rel=1e-12)
    assert out[f"{name}_pcc"] == pytest.approx(_ref_pcc(y, p), rel=1e-10)
    assert out[f"{name}_ccc"] == pytest.approx(_ref_ccc(y, p), rel=1e-10)
    assert out[f"{name}_sagr"] == pytest.approx(_ref_sagr(y, p), rel=1e-12)
  assert out["valence_count"] < len(d["valence"])  # Some were -2.
  # CCC penalizes the +0.1 bias and 0.7 scale that PCC ignores.
  assert out["valence_ccc"] < out["valence_pcc"]


def test_regression_edge_cases():
  rng = np.random.default_rng(2)
  y = rng.uniform(-1, 1, 100)
  perfect = metrics.regression_metrics(y, y)
  assert perfect["ccc"] == pytest.approx(1.0) and perfect["pcc"] == (
      pytest.approx(1.0))
  assert perfect["rmse"] == 0.0 and perfect["sagr"] == 1.0

  neg = metrics.regression_metrics(y, -y)
  assert neg["pcc"] == pytest.approx(-1.0)
  assert neg["ccc"] == pytest.approx(_ref_ccc(y, -y))
  assert neg["ccc"] < -0.9  # -1 exactly only for a zero-mean target.
  assert neg["sagr"] == 0.0

  shifted = metrics.regression_metrics(y, 0.5 * y + 0.2)
  assert shifted["pcc"] == pytest.approx(1.0)
  assert shifted["ccc"] == pytest.approx(_ref_ccc(y, 0.5 * y + 0.2))
  assert shifted["ccc"] < 0.95

  const = metrics.regression_metrics(y, np.full_like(y, 0.3))
  assert math.isnan(const["pcc"])  # Zero prediction variance: undefined.
  assert const["ccc"] == 0.0  # cov = 0, denominator > 0.
  assert const["rmse"] == pytest.approx(np.sqrt(np.mean((y - 0.3) ** 2)))

  # Both constant and equal: CCC is 0/0.
  both = metrics.regression_metrics(np.full(5, 0.5), np.full(5, 0.5))
  assert math.isnan(both["ccc"]) and both["rmse"] == 0.0

  # Sign agreement: 0 is its own sign.
  zs = metrics.regression_metrics(np.array([0.0, 0.0, 0.5, -0.5]),
                                  np.array([0.0, 0.1, 0.2, 0.0]))
  assert zs["sagr"] == pytest.approx(0.5)

  # Entries with a target outside [-1, 1] (or NaN) are dropped, whatever the
  # prediction there.
  y_masked = np.r_[y, -2.0, np.nan, 1.5]
  p_masked = np.r_[0.5 * y, 100.0, -100.0, 3.0]
  masked = metrics.regression_metrics(y_masked, p_masked)
  assert masked == metrics.regression_metrics(y, 0.5 * y)
  assert masked["count"] == 100
  # Boundary values -1 and 1 are real targets.
  assert metrics.regression_metrics(np.array([-1.0, 1.0]),
                                    np.array([0.0, 0.0]))["count"] == 2

  none_valid = metrics.regression_metrics(np.full(4, -2.0), np.zeros(4))
  assert none_valid["count"] == 0
  for key in metrics.REGRESSION_METRICS:
    assert math.isnan(none_valid[key])


def test_no_valid_va_gives_nan_and_json_null():
  d = _random_set(3, n=20)
  out = metrics.evaluate(expression=d["expression"], logits_or_pred=d["pred"],
                         valence=np.full(20, -2.0), arousal=d["arousal"],
                         va_pred=d["va_pred"], num_classes=C)
  assert math.isnan(out["valence_ccc"]) and out["valence_count"] == 0
  assert math.isfinite(out["arousal_ccc"])
  text = json.dumps(fileio.to_json_compatible(out), allow_nan=False)
  back = json.loads(text)
  assert back["valence_rmse"] is None and back["per_class_f1"][6] is None
  assert back["accuracy"] == out["accuracy"]


def test_accumulator_over_padded_batches_equals_whole_set():
  d = _random_set(4, n=103)
  acc = metrics.EvalAccumulator(num_classes=C)
  batch = 16
  for start in range(0, 103, batch):
    sl = slice(start, start + batch)
    real = len(d["expression"][sl])
    pad = batch - real  # Last batch padded with garbage rows.
    mask = np.r_[np.ones(real), np.zeros(pad)]
    acc.update(
        expression=np.r_[d["expression"][sl], np.full(pad, 3)],
        logits_or_pred=np.concatenate([d["logits"][sl], np.zeros((pad, C))]),
        valence=np.r_[d["valence"][sl], np.full(pad, 0.5)],
        arousal=np.r_[d["arousal"][sl], np.full(pad, 0.5)],
        va_pred=np.concatenate([d["va_pred"][sl], np.ones((pad, 2))]),
        example_mask=mask)
  whole = metrics.evaluate(expression=d["expression"],
                           logits_or_pred=d["logits"], valence=d["valence"],
                           arousal=d["arousal"], va_pred=d["va_pred"],
                           num_classes=C)
  got = acc.result()
  assert got["num_examples"] == 103
  assert json.dumps(fileio.to_json_compatible(got)) == json.dumps(
      fileio.to_json_compatible(whole))


def test_bad_input_raises_clear_errors():
  d = _random_set(5, n=10)
  kw = dict(expression=d["expression"], logits_or_pred=d["logits"],
            valence=d["valence"], arousal=d["arousal"], va_pred=d["va_pred"],
            num_classes=C)
  with pytest.raises(ValueError, match="num_classes"):
    metrics.evaluate(**dict(kw, num_classes=C + 1))
  with pytest.raises(ValueError, match="va_pred"):
    metrics.evaluate(**dict(kw, va_pred=d["va_pred"][:9]))
  with pytest.raises(ValueError, match="arousal"):
    metrics.evaluate(**dict(kw, arousal=d["arousal"][:, None]))
  bad = d["expression"].copy()
  bad[4] = 8
  with pytest.raises(ValueError, match="index 4"):
    metrics.evaluate(**dict(kw, expression=bad))
  with pytest.raises(ValueError, match="integer class ids"):
    metrics.evaluate(**dict(kw, logits_or_pred=d["pred"].astype(float)))
  with pytest.raises(ValueError, match="non-empty"):
    metrics.evaluate(**dict(kw, expression=np.zeros(0, int)))
  with pytest.raises(ValueError, match="before any update"):
    metrics.EvalAccumulator(C).result()
