"""data_prep.synthetic: official layout, labels, determinism, learnable cues."""
import collections
import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from affectjax import data as affect_data
from data_prep import layouts
from data_prep import synthetic
from data_prep import synthetic_face


def _read_csv(path):
  with open(path, newline="") as fp:
    return list(csv.DictReader(fp))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synth"))
  synthetic.generate(out, num_train=160, num_val=40, seed=3, image_size=96)
  return out


def test_official_layout_and_columns(tree):
  assert layouts.detect(tree) == "official"
  for name, n in (("training.csv", 160), ("validation.csv", 40)):
    with open(os.path.join(tree, name)) as fp:
      assert fp.readline().strip() == synthetic.CSV_HEADER
    rows = _read_csv(os.path.join(tree, name))
    assert len(rows) == n
    assert tuple(rows[0]) == layouts.OFFICIAL_COLUMNS
    for r in rows:
      img_path = os.path.join(tree, synthetic.IMAGES_DIR,
                              r["subDirectory_filePath"])
      with Image.open(img_path) as im:
        assert im.format == "JPEG" and im.size == (96, 96)
        w, h = im.size
      x, y, bw, bh = (int(r[k]) for k in ("face_x", "face_y", "face_width",
                                           "face_height"))
      # The face box lies inside, and is smaller than, the image.
      assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
      assert bw * bh < 0.9 * w * h
      lm = np.asarray([float(v) for v in r["facial_landmarks"].split(";")])
      assert lm.shape == (136,)
      assert 0 <= int(r["expression"]) <= 7
      assert -1 <= float(r["valence"]) <= 1 and -1 <= float(r["arousal"]) <= 1


def test_class_balance_train_imbalanced_val_balanced():
  counts = synthetic.class_counts(1000, "train")
  assert sum(counts) == 1000
  # AffectNet's order of frequency: happy > neutral > sad/anger > rare ones.
  assert counts[1] > counts[0] > counts[2] > counts[7]
  # The floor keeps every class at >= MIN_CLASS_FRACTION of the split.
  assert min(counts) >= int(synthetic.MIN_CLASS_FRACTION * 1000) - 1
  assert synthetic.class_counts(80, "val") == [10] * 8
  assert sum(synthetic.class_counts(83, "val")) == 83


def test_affectnet_class_balance(tmp_path):
  """--class_balance=affectnet: AffectNet's own train proportions (no floor),
  exact to one row; validation stays balanced."""
  p = np.asarray(synthetic.AFFECTNET_TRAIN_COUNTS) / sum(
      synthetic.AFFECTNET_TRAIN_COUNTS)
  counts = synthetic.class_counts(10_000, "train", class_balance="affectnet")
  assert sum(counts) == 10_000
  np.testing.assert_allclose(counts, p * 10_000, atol=1)
  assert 0.45 < counts[1] / 10_000 < 0.5 and counts[7] / 10_000 < 0.02
  assert synthetic.class_counts(10_000, "train") != counts  # Default: floor.
  assert synthetic.class_counts(80, "val", class_balance="affectnet") == (
      [10] * 8)
  with pytest.raises(ValueError, match="--class_balance"):
    synthetic.class_counts(10, "train", class_balance="uniform")
  # The generated CSVs follow those counts.
  synthetic.generate(str(tmp_path), num_train=150, num_val=16, seed=0,
                     image_size=32, class_balance="affectnet")
  for name, split, n in (("training.csv", "train", 150),
                         ("validation.csv", "val", 16)):
    hist = collections.Counter(int(r["expression"]) for r in _read_csv(
        tmp_path / name))
    assert [hist[c] for c in range(8)] == synthetic.class_counts(
        n, split, class_balance="affectnet")


def test_valence_arousal_follow_class(tree):
  rows = _read_csv(os.path.join(tree, "training.csv")) + _read_csv(
      os.path.join(tree, "validation.csv"))
  va = {}
  for r in rows:
    va.setdefault(int(r["expression"]), []).append(
        (float(r["valence"]), float(r["arousal"])))
  mean = {c: np.mean(v, 0) for c, v in va.items()}
  assert mean[1][0] > 0.4  # happy: positive valence
  assert mean[2][0] < -0.3 and mean[2][1] < 0  # sad: negative, calm
  assert mean[6][0] < -0.2 and mean[6][1] > 0.4  # anger: negative, aroused
  assert mean[3][1] > 0.4  # surprise: aroused


def test_deterministic_given_seed(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.generate(a, 12, 4, seed=7, image_size=64)
  synthetic.generate(b, 12, 4, seed=7, image_size=64, num_workers=2,
                     chunk_size=5)
  synthetic.generate(c, 12, 4, seed=8, image_size=64)

  def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
      for f in sorted(files):
        h.update(f.encode())
        with open(os.path.join(dirpath, f), "rb") as fp:
          h.update(fp.read())
    return h.hexdigest()

  assert digest(a) == digest(b)  # Worker count does not change the output.
  assert digest(a) != digest(c)


def test_expression_drives_pixels():
  """Mean face crops differ more between classes than within (learnable)."""
  crops = {}
  for expr in (1, 3, 6):
    for i in range(12):
      rng = np.random.default_rng([0, expr, i])
      v, a = synthetic_face._sample_va(expr, rng)  # pylint: disable=protected-access
      # Full intensity, no occluders/lighting: the clean class signal.
      img, lm, _ = synthetic_face.render_face(expr, v, a, rng, 96,
                                              occlude=False)
      # Mouth region, located by the landmarks (so pose jitter cancels).
      mx, my = lm[48:68].mean(0).astype(int)
      crops.setdefault(expr, []).append(
          img[my - 10:my + 10, mx - 16:mx + 16].astype(float).mean(2))
  means = {e: np.mean(v, 0) for e, v in crops.items()}
  within = np.mean([np.abs(c - means[e]).mean() for e, cs in crops.items()
                    for c in cs])
  between = np.mean([np.abs(means[1] - means[3]).mean(),
                     np.abs(means[3] - means[6]).mean(),
                     np.abs(means[1] - means[6]).mean()])
  assert between > 0.5 * within, (between, within)


def test_landmarks_match_drawn_face():
  rng = np.random.default_rng(0)
  img, lm, (x, y, w, h) = synthetic_face.render_face(3, 0.0, 0.8, rng, 128,
                                                occlude=False)
  # Every landmark lies inside the image, and the eyes/mouth lie in the box.
  assert (lm >= -1).all() and (lm <= 129).all()
  inner = lm[36:68]
  assert (inner[:, 0] >= x).all() and (inner[:, 0] <= x + w).all()
  assert (inner[:, 1] >= y).all() and (inner[:, 1] <= y + h).all()
  # Surprise draws a dark open mouth: the mouth centre is darker than the
  # cheek beside it.
  mx, my = lm[60:68].mean(0).round().astype(int)
  cheek = img[my, int(lm[48, 0]) - 8].mean()
  assert img[my, mx].mean() < cheek - 30


def test_sampler_statistics_match_documented_constants():
  """Intensity, ambiguity and annotator noise follow the module constants."""
  n = 3000
  draws = {c: [synthetic_face.sample_face(c, np.random.default_rng([11, c, i]))
               for i in range(n)] for c in range(8)}
  all_draws = [f for fs in draws.values() for f in fs]
  ambiguous = np.asarray([f["blend"] > 0 for f in all_draws])
  # Binomial tolerance: 4 standard deviations around the documented rate.
  p = synthetic_face.AMBIGUOUS_FRACTION
  assert 0.10 <= p <= 0.20
  assert abs(ambiguous.mean() - p) < 4 * np.sqrt(p * (1 - p) / ambiguous.size)
  lo, hi = synthetic_face.AMBIGUOUS_BLEND
  for c, fs in draws.items():
    for f in fs:
      if f["blend"] > 0:
        assert f["other"] in synthetic_face.CONFUSABLE[c]
        assert lo <= f["blend"] <= hi
      else:
        assert f["other"] == c
  intensity = np.asarray([f["intensity"] for f in all_draws])
  a, b = synthetic_face.INTENSITY_BETA
  assert abs(intensity.mean() - a / (a + b)) < 0.01
  assert (intensity < 0.3).mean() > 0.25  # Many subtle expressions.
  # Valence magnitude grows with intensity (unambiguous happy faces).
  happy = [f for f in draws[1] if f["blend"] == 0]
  r = np.corrcoef([f["intensity"] for f in happy],
                  [f["valence"] for f in happy])[0, 1]
  assert r > 0.3, r
  # ... while the class average stays at the documented AffectNet-like mean.
  for c in (1, 2, 6):
    unamb = [f for f in draws[c] if f["blend"] == 0]
    vm, _, am, _ = synthetic_face.VA_MEAN_STD[c]
    assert abs(np.mean([f["valence_label"] for f in unamb]) - vm) < 0.06
    assert abs(np.mean([f["arousal_label"] for f in unamb]) - am) < 0.06
  # Annotator noise: label - drawn has the documented spread (away from the
  # clip at +-1, which would shrink it).
  diff = np.asarray([f["valence_label"] - f["valence"] for f in all_draws
                     if abs(f["valence"]) < 0.7])
  assert abs(diff.std() - synthetic_face.VA_LABEL_NOISE) < 0.01
  assert abs(diff.mean()) < 0.01


def test_intensity_and_blend_shape_the_landmarks():
  """Intensity 0 draws neutral; more intensity moves further from it; a full
  blend toward the confusable class draws that class."""
  def lm(expr, **kw):  # Same rng seed: the same per-image jitter each call.
    return synthetic_face.face_landmarks(expr, 0.0, 0.0,
                                    np.random.default_rng(5), **kw)[0]
  neutral = lm(0)
  np.testing.assert_allclose(lm(6, intensity=0.0), neutral)
  dist = [np.abs(lm(6, intensity=t) - neutral).sum()
          for t in (0.25, 0.5, 0.75, 1.0)]
  assert all(np.diff(dist) > 0), dist
  np.testing.assert_allclose(lm(3, other=4, blend=1.0), lm(4))
  half = lm(3, other=4, blend=0.5)
  np.testing.assert_allclose(half, (lm(3) + lm(4)) / 2, atol=1e-9)


def test_csv_labels_carry_annotator_noise(tree):
  """The CSV holds the noisy annotator labels, not the drawn values."""
  rows = _read_csv(os.path.join(tree, "training.csv"))
  for i, r in enumerate(rows[:20]):
    rng = np.random.default_rng([3, 0, i])
    f = synthetic_face.sample_face(int(r["expression"]), rng)
    assert float(r["valence"]) == pytest.approx(f["valence_label"], abs=1e-6)
    assert float(r["arousal"]) == pytest.approx(f["arousal_label"], abs=1e-6)


def test_cli(tmp_path):
  """The absl command line, in a real subprocess."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(
      [sys.executable, "-m", "data_prep.synthetic", f"--output_dir={tmp_path}",
       "--num_train=5", "--num_val=3", "--num_workers=1", "--image_size=64",
       "--class_balance=affectnet",
       f"--contact_sheet={tmp_path / 'sheet.png'}"],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert "affectnet class balance" in res.stdout
  assert len(_read_csv(tmp_path / "training.csv")) == 5
  assert len(_read_csv(tmp_path / "validation.csv")) == 3
  assert Image.open(tmp_path / "sheet.png").size[0] > 0
  assert affect_data.LABEL_NAMES_8[0] == "neutral"
  res = subprocess.run([sys.executable, "-m", "data_prep.synthetic",
                        "--help"], cwd=repo, capture_output=True, text=True,
                       timeout=60)
  assert "--class_balance: <floored|affectnet>" in res.stdout, res.stdout
  res = subprocess.run([sys.executable, "-m", "data_prep.synthetic",
                        f"--output_dir={tmp_path}", "--class_balance=even"],
                       cwd=repo, capture_output=True, text=True, timeout=60)
  assert res.returncode == 1 and "class_balance" in res.stderr
