"""`affectjax.evaluate` and `affectjax.scoring` on a real tiny trained run."""
import csv
import json

import jax
import numpy as np
import pytest
from PIL import Image

from affectjax import data
from affectjax import evaluate as evaluate_lib
from affectjax import scoring
from affectjax import metrics as metrics_lib
from affectjax import workdir as workdir_lib
from tests import use_fixtures


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, synthetic_arrayrecord):
  return use_fixtures.trained_workdir(tmp_path_factory, synthetic_arrayrecord)


@pytest.fixture(scope="session")
def run(run_dir):
  """The run opened once at its latest step (eval steps compile once)."""
  return workdir_lib.open_run(run_dir, checkpoint="latest")


def _trainer_eval(run_dir, step):
  lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in lines if r["split"] == "val" and r["step"] == step][-1]


def test_evaluate_writes_files_equal_to_trainer_eval(run_dir, run):
  result, out = evaluate_lib.run_evaluation(run)
  assert out == run_dir / "eval" / "latest-val"
  trainer = _trainer_eval(run_dir, 6)
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["step"] == 6 and saved["num_examples"] == 52
  for key in ("accuracy", "macro_f1", "loss", "valence_ccc", "arousal_rmse",
              "confusion_matrix"):
    np.testing.assert_allclose(saved[key], trainer[key], rtol=1e-6, err_msg=key)
  # Per-class numbers, support included, come from the same confusion matrix.
  cm = np.asarray(saved["confusion_matrix"])
  assert saved["per_class_support"] == cm.sum(axis=1).tolist()
  with np.errstate(invalid="ignore", divide="ignore"):
    np.testing.assert_allclose(
        np.asarray(saved["per_class_recall"], float), np.diag(cm) / cm.sum(1))
  # predictions.csv: every example once, in source order, consistent with cm.
  rows = list(csv.DictReader((out / "predictions.csv").open()))
  assert [int(r["index"]) for r in rows] == list(range(52))
  src = data.source(run.config.data.dir, "val")
  assert rows[5]["path"] == src[5]["path"]
  recount = np.zeros_like(cm)
  for r in rows:
    recount[int(r["true_class"]), int(r["pred_class"])] += 1
    probs = [float(r[f"prob_{n}"]) for n in data.LABEL_NAMES_8]
    assert abs(sum(probs) - 1) < 1e-4 and int(np.argmax(probs)) == int(r["pred_class"])
  np.testing.assert_array_equal(recount, cm)
  # The plots are real PNGs of a sensible size.
  for name in ("confusion_matrix.png", "confusion_matrix_normalized.png",
               "circumplex.png", "per_class_f1.png"):
    with Image.open(out / name) as im:
      assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200, name


def _examples(run, tta="none", classes=None):
  return scoring.evaluate(run.state, run.eval_fn(tta), run.config, run.mesh,
                             collect=True, classes=classes)


def test_seven_class_protocol_equals_hand_computation(run):
  full = _examples(run)
  seven = _examples(run, classes=7)
  ex = full["examples"]
  keep = ex["expression"] != 7
  pred7 = ex["logits"][keep][:, :7].argmax(1)
  true7 = ex["expression"][keep]
  assert seven["num_examples"] == int(keep.sum()) < 52
  assert seven["accuracy"] == pytest.approx(np.mean(pred7 == true7))
  from sklearn.metrics import f1_score  # pylint: disable=g-import-not-at-top
  assert seven["macro_f1"] == pytest.approx(
      f1_score(true7, pred7, average="macro"))
  assert np.asarray(seven["confusion_matrix"]).shape == (7, 7)
  assert seven["examples"]["logits"].shape == (int(keep.sum()), 7)
  assert "loss" not in seven
  v = metrics_lib.regression_metrics(ex["valence"][keep], ex["va"][keep, 0])
  assert seven["valence_ccc"] == pytest.approx(v["ccc"])


def test_flip_tta_equals_mean_of_two_explicit_passes(run):
  flipped = _examples(run, tta="flip")
  graphdef, w = run.graphdef, run.weights()
  src = data.source(run.config.data.dir, "val")
  images = np.stack([src[i]["image"] for i in range(52)])
  fwd = jax.jit(lambda x: scoring.predict_images(
      graphdef, w, x, image_size=run.config.image_size))
  l1, va1 = fwd(images)
  l2, va2 = fwd(images[:, :, ::-1])
  np.testing.assert_allclose(flipped["examples"]["logits"], (l1 + l2) / 2,
                             atol=1e-5)
  np.testing.assert_allclose(flipped["examples"]["va"], (va1 + va2) / 2,
                             atol=1e-5)
  assert not np.allclose(l1, l2, atol=1e-4)  # The mirror really differs.


def test_bad_checkpoint_and_classes_name_the_flag(run_dir, run):
  with pytest.raises(FileNotFoundError, match="--checkpoint=5"):
    workdir_lib.open_run(run_dir, checkpoint="5")
  with pytest.raises(ValueError, match="--checkpoint='last'"):
    workdir_lib.open_run(run_dir, checkpoint="last")
  with pytest.raises(ValueError, match="--classes=6"):
    scoring.evaluate(run.state, run.eval_fn(), run.config, run.mesh,
                        classes=6)
  with pytest.raises(FileNotFoundError, match="config.json"):
    workdir_lib.open_run(run_dir / "nope")


def test_default_checkpoint_is_the_recorded_best(run_dir):
  from affectjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  best = ckpt_lib.read_best_record(run_dir / "checkpoints")
  assert best is not None, "the trainer saves evaluated steps with metrics"
  ckpt = workdir_lib.checkpointer(run_dir, workdir_lib.load_config(run_dir))
  assert workdir_lib.resolve_step(ckpt, "best") == (best["step"], "best")
  assert ckpt.metrics(best["step"])[best["metric"]] == best["value"]
  ckpt.close()


def test_best_falls_back_to_latest_without_metrics(tmp_path):
  from affectjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=3,
                               best_metric="macro_f1")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    workdir_lib.resolve_step(ckpt, "best")
  for step in (1, 2):
    ckpt.save(step, {"w": np.zeros(2)})
  ckpt.wait()
  assert workdir_lib.resolve_step(ckpt, "best") == (2, "latest")
  assert workdir_lib.resolve_step(ckpt, "1") == (1, "1")
  ckpt.close()
