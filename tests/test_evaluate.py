"""`affectjax.evaluate` and `affectjax.scoring` on real tiny trained runs.

The 8-class run is the one the after-training tests share; a 7-class run is
trained here on the same synthetic faces prepared with ``--classes=7`` (the
same images without Contempt), so cross-dataset scores (8 -> 7 and 7 -> 8
classes) can be checked against the 7-class protocol on the same rows.
"""
import csv
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from affectjax import augment
from affectjax import data
from affectjax import evaluate as evaluate_lib
from affectjax import scoring
from affectjax import metrics as metrics_lib
from affectjax import predict
from affectjax import train
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
  # The printed table says what was evaluated (not the trainer's "last step").
  from affectjax import summary  # pylint: disable=g-import-not-at-top
  first = summary.table(result, heading=evaluate_lib.heading(result)).splitlines()[0]
  assert first == (f"Split 'val' of {run.config.data.dir} at step 6 (latest "
                   "checkpoint): 52 examples"), first
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
  assert seven["class_names"] == list(data.LABEL_NAMES_7)
  assert seven["classes_left_out"] == {"contempt": "left out by --classes=7"}
  assert seven["rows_left_out"] == 52 - int(keep.sum())
  assert seven["rows_left_out_by_class"] == {"contempt": 52 - int(keep.sum())}
  assert full["rows_left_out"] == 0 and full["classes_left_out"] == {}


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


def test_crops_tta_equals_mean_of_ten_pillow_views(run):
  """tta="crops": the image, 4 corner crops (Pillow's BILINEAR with a box,
  side TTA_CROP_SIDE) and the 5 mirrors, one plain pass each, averaged."""
  crops = _examples(run, tta="crops")
  graphdef, w = run.graphdef, run.weights()
  src = data.source(run.config.data.dir, "val")
  images = np.stack([src[i]["image"] for i in range(52)])
  size = run.config.image_size
  side = scoring.TTA_CROP_SIDE * size
  fwd = jax.jit(lambda x: scoring.predict_images(graphdef, w, x,
                                                 image_size=size))
  # The crops are of the model-size image (resize_images: Pillow-tested).
  resized = np.asarray(augment.resize_images(images, size))
  assert images.shape[1] != size == resized.shape[1]

  def pillow_crop(im, top, left):  # Float ("F") channels: no uint8 rounding.
    return np.stack([np.asarray(Image.fromarray(im[..., c]).resize(
        (size, size), Image.BILINEAR,
        box=(left, top, left + side, top + side))) for c in range(3)], -1)

  views = [resized]
  for top in (0.0, size - side):
    for left in (0.0, size - side):
      views.append(np.stack([pillow_crop(im, top, left) for im in resized]))
  views += [v[:, :, ::-1] for v in views]
  outs = [fwd(v) for v in views]
  logits = np.mean([o[0] for o in outs], axis=0)
  va = np.mean([o[1] for o in outs], axis=0)
  np.testing.assert_allclose(crops["examples"]["logits"], logits, atol=1e-4)
  np.testing.assert_allclose(crops["examples"]["va"], va, atol=1e-4)
  flipped = _examples(run, tta="flip")
  assert not np.allclose(crops["examples"]["logits"],
                         flipped["examples"]["logits"], atol=1e-2)


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


# --------------------------------------------------------------------------
# A 7-class run, and cross-dataset evaluation: classes matched by name.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data7(synthetic_arrayrecord, tmp_path_factory):
  """The session's synthetic AffectNet prepared again with --classes=7."""
  from data_prep import affectnet  # pylint: disable=g-import-not-at-top
  raw = pathlib.Path(synthetic_arrayrecord).parent / "raw"  # conftest's tree.
  assert (raw / "validation.csv").exists(), raw
  out = tmp_path_factory.mktemp("seven") / "affectnet7"
  affectnet.prepare(str(raw), str(out), image_size=24, num_workers=1,
                    classes=7)
  return str(out)


@pytest.fixture(scope="module")
def run7(data7, tmp_path_factory):
  """A 7-class model trained end to end: (workdir, the trainer's result)."""
  config = use_fixtures.tiny_config(data7)
  config.num_classes = 7
  config.total_steps = config.eval_every_steps = 2  # One evaluation, at 2.
  workdir = tmp_path_factory.mktemp("run7") / "workdir"
  return workdir, train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def eval7(run7):
  """The 7-class run's evaluate output on its own data: (result, out dir)."""
  return evaluate_lib.run_evaluation(run7[0], checkpoint="latest")


def _contempt_rows(data_dir) -> int:
  return int((data.source(data_dir, "val").labels() == 7).sum())


def _assert_same_scores(a: dict, b: dict) -> None:
  """Two evaluations of the same rows with the same logits."""
  assert a["class_names"] == b["class_names"]
  for key in ("num_examples", "accuracy", "macro_f1", "confusion_matrix",
              "per_class_f1", "valence_ccc", "arousal_rmse"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(a["examples"]["logits"], b["examples"]["logits"],
                             atol=1e-5)
  np.testing.assert_array_equal(a["examples"]["expression"],
                                b["examples"]["expression"])


def test_seven_class_model_trains_evaluates_and_predicts(run7, eval7, data7):
  workdir, trained = run7
  assert trained["step"] == 2
  assert trained["num_examples"] == len(data.source(data7, "val"))
  assert np.asarray(trained["confusion_matrix"]).shape == (7, 7)
  assert np.isfinite(trained["loss"])
  result, out = eval7
  assert out == workdir / "eval" / "latest-val"
  saved = json.loads((out / "metrics.json").read_text())
  for key in ("loss", "accuracy", "macro_f1", "confusion_matrix"):
    np.testing.assert_allclose(saved[key], trained[key], rtol=1e-6,
                               err_msg=key)
  assert saved["class_names"] == list(data.LABEL_NAMES_7)
  assert saved["rows_left_out"] == 0 and saved["classes_left_out"] == {}
  # predict: 7 class probabilities, the evaluation's own logits.
  src = data.source(data7, "val")
  faces = np.stack([src[i]["image"] for i in range(5)])
  rows = predict.Predictor.from_workdir(
      workdir, checkpoint="latest", batch_size=8).predict(list(faces))
  probs = np.asarray([[r[f"prob_{n}"] for n in data.LABEL_NAMES_7]
                      for r in rows])
  np.testing.assert_allclose(probs, result["examples"]["probs"][:5],
                             atol=1e-5)
  assert not any(k == "prob_contempt" for k in rows[0])
  assert [r["name"] for r in rows] == [
      data.LABEL_NAMES_7[c] for c in probs.argmax(1)]


def test_eight_class_model_on_seven_class_data_drops_contempt(run_dir, run,
                                                              data7):
  cross, out = evaluate_lib.run_evaluation(run_dir, checkpoint="latest",
                                           data_dir=data7)
  assert out == run_dir / "eval" / "latest-val-7class-on-affectnet7"
  protocol = _examples(run, classes=7)  # The run's own data, --classes=7.
  _assert_same_scores(cross, protocol)  # The same faces, Contempt dropped.
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["data_dir"] == data7
  assert saved["class_names"] == list(data.LABEL_NAMES_7)
  assert saved["classes_left_out"] == {"contempt": "not in the data"}
  assert saved["rows_left_out"] == 0 and "loss" not in saved
  assert protocol["rows_left_out"] == _contempt_rows(run.config.data.dir)
  assert evaluate_lib.class_line(saved) == (
      "Classes compared: 7 (neutral, happy, sad, surprise, fear, disgust, "
      "anger); not in the data: contempt. Rows left out: 0. No loss: the "
      "model's loss is defined on its own classes, not on these.")
  header = next(csv.reader((out / "predictions.csv").open()))
  assert [h for h in header if h.startswith("prob_")] == [
      f"prob_{n}" for n in data.LABEL_NAMES_7]


def test_seven_class_model_on_eight_class_data_leaves_out_contempt_rows(
    run7, eval7, synthetic_arrayrecord):
  workdir, _ = run7
  own, _ = eval7
  cross, out = evaluate_lib.run_evaluation(
      workdir, checkpoint="latest", data_dir=synthetic_arrayrecord)
  assert out == workdir / "eval" / "latest-val-on-prepared"
  _assert_same_scores(cross, own)  # The same faces: Contempt rows left out.
  k = _contempt_rows(synthetic_arrayrecord)
  saved = json.loads((out / "metrics.json").read_text())
  assert 0 < k == saved["rows_left_out"] == 52 - saved["num_examples"]
  assert saved["rows_left_out_by_class"] == {"contempt": k}
  assert saved["classes_left_out"] == {"contempt": "not in the model"}
  assert "loss" in own and "loss" not in saved
  assert f"not in the model: contempt. Rows left out: {k} (contempt {k})." in (
      evaluate_lib.class_line(saved))
  rows = list(csv.DictReader((out / "predictions.csv").open()))
  assert len(rows) == 52 - k and all(r["true_name"] != "contempt"
                                     for r in rows)


def _val_with_class_order(src_dir: str, dst, names) -> str:
  """``src_dir``'s val split rewritten with its labels coded in the class
  order ``names`` (the same faces: a data set that orders its classes like
  FER2013 but names them like affectjax)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  manifest = data.read_manifest(src_dir)
  old = manifest["label_names"]
  src = data.source(src_dir, "val")
  dst.mkdir()
  shard = dst / data.shard_filename("val", 0, 1)
  writer = array_record_module.ArrayRecordWriter(str(shard),
                                                 "group_size:1,uncompressed")
  for record in src.read_records(range(len(src))):
    ex = data.decode_record(record, decode_image=False)
    writer.write(data.encode_record(
        image=ex["image"], expression=names.index(old[ex["expression"]]),
        valence=ex["valence"], arousal=ex["arousal"],
        landmarks=ex["landmarks"], path=ex["path"]))
  writer.close()
  blob = shard.read_bytes()
  manifest["label_names"] = list(names)
  manifest["splits"] = {"val": {"shards": [{
      "file": shard.name, "num_examples": len(src), "num_bytes": len(blob),
      "sha256": hashlib.sha256(blob).hexdigest()}]}}
  (dst / data.MANIFEST_NAME).write_text(json.dumps(manifest))
  return str(dst)


def test_same_classes_in_another_order_score_as_the_own_data(
    run7, eval7, data7, tmp_path):
  fer_order = ("anger", "disgust", "fear", "happy", "sad", "surprise",
               "neutral")  # FER2013's order in affectjax's names.
  other = _val_with_class_order(data7, tmp_path / "fer_order", fer_order)
  run = workdir_lib.open_run(run7[0], checkpoint="latest", data_dir=other)
  result = scoring.evaluate(run.state, run.eval_fn(), run.config, run.mesh,
                            collect=True,
                            model_classes=run.contract.class_names)
  own, _ = eval7
  _assert_same_scores(result, own)  # Matched by name, not by position.
  # The same classes: the loss is reported, with the run's class weights.
  assert result["loss"] == pytest.approx(own["loss"], rel=1e-6)
  assert result["rows_left_out"] == 0 and result["classes_left_out"] == {}


def test_classes_are_matched_by_name_not_position():
  fer_order = ("anger", "disgust", "fear", "happy", "sad", "surprise",
               "neutral")  # FER2013's order in affectjax's names.
  m = scoring.match_classes(data.LABEL_NAMES_8, fer_order)
  assert m.compared == data.LABEL_NAMES_7 and not m.identical
  # Each data id is fed to the step as the model's id of the same name.
  assert [data.LABEL_NAMES_8[i] for i in m.step_ids()] == list(fer_order)
  assert m.model_columns().tolist() == list(range(7))
  assert scoring.match_classes(data.LABEL_NAMES_7, fer_order).identical
  m = scoring.match_classes(fer_order, data.LABEL_NAMES_8)
  assert m.compared == fer_order
  assert m.left_out == {"contempt": "not in the model"}
  assert m.step_ids()[7] == 7 + 7  # Outside the model's 7: masked, decodable.
  assert m.row_names()[m.step_ids()[7]] == "contempt"
  with pytest.raises(ValueError, match="--classes=8.*share only"):
    scoring.match_classes(data.LABEL_NAMES_7, data.LABEL_NAMES_8, classes=8)


def test_data_sharing_fewer_than_two_classes_fails_clearly(run, tmp_path):
  manifest = data.read_manifest(run.config.data.dir)
  manifest["label_names"] = ["cat", "dog", "happy", "bird", "fish", "cow",
                             "owl", "ant"]
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  config = run.config.copy_and_resolve_references()
  config.data.dir = str(tmp_path)
  with pytest.raises(ValueError, match=f"{tmp_path} shares 1 class.*happy"):
    scoring.evaluate(run.state, run.eval_fn(), config, run.mesh)
