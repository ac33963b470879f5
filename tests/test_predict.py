"""`affectjax.predict`: files, directories, boxes CSVs, bad inputs, CLI."""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from affectjax import data
from affectjax import scoring
from affectjax import predict
from affectjax import workdir as workdir_lib
from data_prep import images as image_lib
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
  x0, y0, x1, y1 = image_lib.crop_box((52, 22, 20, 20), 0.1, 80, 100)
  crop = image_lib.resize(photo[y0:y1, x0:x1], predictor.input_size)
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
  x0, y0, x1, y1 = image_lib.crop_box((10, 10, 24, 24), 0.1, 60, 120)
  probs, _ = _reference(run_dir, image_lib.resize(photo[y0:y1, x0:x1],
                                                  p.input_size)[None])
  np.testing.assert_allclose(
      [rows[1][f"prob_{n}"] for n in data.LABEL_NAMES_8], probs[0], atol=1e-5)


def test_opencv_detector_runs_when_installed():
  pytest.importorskip("cv2", reason="OpenCV is the optional [detect] extra")
  detect = predict.opencv_face_detector()
  assert detect(np.zeros((64, 64, 3), np.uint8)) == []
