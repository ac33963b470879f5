"""data_prep on the public expression sets in their published form (FER2013's
CSV, FERPlus, RAF-DB basic, Kaggle's train/ + test/ tree): detection, exact
counts, every skip explained, labels mapped to affectjax's ids by name."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from affectjax import data as affect_data
from data_prep import affectnet
from data_prep import public_sets
from data_prep import registry
from data_prep import rows
from tests import public_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = public_fixtures.SIDE  # FER2013's own size: no resize, exact pixels.


_NOT_SPLITS = ("faces", "paths")


def _check_splits(manifest, want):
  for split, w in want.items():
    if split in _NOT_SPLITS:
      continue
    got = manifest["splits"][split]
    assert (got["rows"], got["written"], got["skipped"],
            got["class_counts"]) == (w["rows"], w["written"], w["skipped"],
                                     w["class_counts"]), split
  assert set(manifest["splits"]) == {s for s in want if s not in _NOT_SPLITS}


def _check_paths(out, want):
  """The records of the images `want['paths']` names carry the ids written
  out by hand there."""
  for split, paths in want["paths"].items():
    got = {p: int(e["expression"]) for p, e in _by_path(out, split).items()}
    assert {p: got.get(p) for p in paths} == paths, split


def _by_path(out, split):
  src = affect_data.source(out, split)
  return {src[i]["path"]: src[i] for i in range(len(src))}


def test_fer2013_csv(tmp_path):
  root, out = str(tmp_path / "fer"), str(tmp_path / "out")
  want = public_fixtures.write_fer2013(root)
  assert registry.detect(root) == "fer2013"
  m = affectnet.prepare(root, out, image_size=S, encoding="raw",
                        progress=False)
  _check_splits(m, want)
  assert m["num_classes"] == 7 and m["dataset"] == "FER2013"
  assert m["label_names"] == list(affect_data.LABEL_NAMES_7)
  # FER2013's order (0 angry ... 6 neutral) -> affectjax ids by name.
  names = m["source_label_names"]
  assert {names[k]: m["label_names"][v]
          for k, v in m["label_mapping"].items()} == {
              "angry": "anger", "disgust": "disgust", "fear": "fear",
              "happy": "happy", "sad": "sad", "surprise": "surprise",
              "neutral": "neutral"}
  assert m["split_sources"] == {"train": "fer2013.csv Usage=Training",
                                "holdout": "fer2013.csv Usage=PublicTest",
                                "val": "fer2013.csv Usage=PrivateTest"}
  ex = m["splits"]["train"]["skip_examples"]
  assert ex["unknown_split"][0]["row"] == 33
  assert "Validation" in ex["unknown_split"][0]["detail"]
  assert "2303 pixel values" in ex["malformed_row"][0]["detail"]
  # The pixels themselves, written losslessly as gray RGB, with their label.
  faces = want["faces"]
  for split in ("train", "holdout", "val"):
    for path, e in _by_path(out, split).items():
      line = int(path.split(":")[1])
      label, px = faces[line]
      assert int(e["expression"]) == label
      np.testing.assert_array_equal(e["image"], np.stack([px] * 3, -1))
      assert e["valence"] == -2.0 and e["arousal"] == -2.0


def test_fer2013_refuses_a_second_holdout(tmp_path):
  public_fixtures.write_fer2013(str(tmp_path))
  with pytest.raises(ValueError, match="own holdout"):
    affectnet.prepare(str(tmp_path), str(tmp_path / "out"), image_size=S,
                      holdout_fraction=0.1, progress=False)


def test_ferplus_majority_vote(tmp_path):
  root, out = str(tmp_path / "ferplus"), str(tmp_path / "out")
  want = public_fixtures.write_ferplus(root)
  assert registry.detect(root) == "ferplus"
  m = affectnet.prepare(root, out, image_size=S, encoding="raw",
                        progress=False)
  _check_splits(m, want)
  for split, counts in public_fixtures.FERPLUS_COUNTS.items():
    assert m["splits"][split]["class_counts"] == counts, split
  assert m["num_classes"] == 8 and m["label_names"][7] == "contempt"
  assert m["label_mapping"]["contempt"] == 7
  assert m["label_mapping"]["happiness"] == 1
  ex = m["splits"]["train"]["skip_examples"]
  assert "FERPlus removed" in ex["dropped_by_ferplus"][0]["detail"]
  assert ex["vote_tied"][0]["detail"] == "votes happiness=5, surprise=5"
  for split in ("train", "holdout", "val"):
    for name, e in _by_path(out, split).items():
      label, px = want["faces"][name]
      assert int(e["expression"]) == label, name
      np.testing.assert_array_equal(e["image"][..., 0], px)
  # The 7-class protocol leaves Contempt out, counted.
  m7 = affectnet.prepare(root, str(tmp_path / "out7"), image_size=S,
                         classes=7, progress=False)
  assert m7["splits"]["train"]["skipped"]["excluded_class"] == 1
  assert "contempt" not in m7["label_mapping"]


def test_ferplus_folders_with_label_csv(tmp_path):
  """FERPlus's FER2013Train/Valid/Test folders of PNGs, each with its
  label.csv (image name, quoted face box, 10 votes; no header): the same
  majority vote as fer2013new.csv, Train -> train, Valid -> holdout, Test ->
  val, every bad row counted."""
  root, out = str(tmp_path / "FERPlus" / "data"), str(tmp_path / "out")
  want = public_fixtures.write_ferplus_folders(root)
  # Detected from the folder itself or its parent (a clone of a repository
  # that keeps them under data/, with fer2013new.csv but no fer2013.csv).
  (tmp_path / "FERPlus" / "fer2013new.csv").write_text(
      public_fixtures.FERPLUS_HEADER + "\n")
  assert registry.detect(root) == "ferplus_folders"
  assert registry.detect(str(tmp_path / "FERPlus")) == "ferplus_folders"
  m = affectnet.prepare(root, out, image_size=S, encoding="raw",
                        progress=False)
  _check_splits(m, want)
  for split, counts in public_fixtures.FERPLUS_COUNTS.items():
    assert m["splits"][split]["class_counts"] == counts, split
  assert m["num_classes"] == 8 and m["dataset"] == "FERPlus"
  assert m["layout"] == "ferplus_folders"
  assert m["label_mapping"]["contempt"] == 7
  assert m["split_sources"] == {
      "train": "FER2013Train/label.csv (Usage=Training)",
      "holdout": "FER2013Valid/label.csv (Usage=PublicTest)",
      "val": "FER2013Test/label.csv (Usage=PrivateTest)"}
  assert m["holdout"] == {"from": "FER2013Valid/label.csv (Usage=PublicTest)"}
  assert m["unused_inputs"] == []
  ex = m["splits"]["train"]["skip_examples"]
  assert ex["vote_tied"][0] == {"row": 5, "path": "fer0000004.png",
                                "detail": "votes happiness=5, surprise=5"}
  assert ex["missing_file"][0]["path"] == "fer0000090.png"
  assert "12 fields" in ex["malformed_row"][0]["detail"]
  assert ex["bad_face_box"][0]["row"] == 10
  seen = set()
  for split in ("train", "holdout", "val"):
    for name, e in _by_path(out, split).items():
      label, px = want["faces"][name]
      assert int(e["expression"]) == label, name
      np.testing.assert_array_equal(e["image"][..., 0], px)
      seen.add(name)
  assert seen == set(want["faces"])
  with pytest.raises(ValueError, match="own holdout"):
    affectnet.prepare(root, str(tmp_path / "o2"), image_size=S,
                      holdout_fraction=0.1, progress=False)


def test_ferplus_folders_without_valid_carve_a_holdout(tmp_path):
  """Without FER2013Valid/ (e.g. a fine-tune's tree whose FER2013Train is a
  symlink to FER+'s Valid faces, docs/RECIPES.md) --holdout_fraction carves
  the holdout from train, as for any layout without its own."""
  root, out = str(tmp_path / "FERPlus"), str(tmp_path / "out")
  want = public_fixtures.write_ferplus_folders(str(tmp_path / "published"))
  os.makedirs(root)
  for folder in ("FER2013Train", "FER2013Test"):
    os.symlink(tmp_path / "published" / folder, os.path.join(root, folder))
  m = affectnet.prepare(root, out, image_size=S, encoding="raw",
                        holdout_fraction=0.5, follow_symlinks=True,
                        progress=False)
  assert m["holdout"]["from"] == "train"
  kept = want["train"]["written"]
  assert (m["splits"]["train"]["written"] + m["splits"]["holdout"]["written"]
          == kept) and m["splits"]["holdout"]["written"] > 0
  assert m["splits"]["val"]["class_counts"] == want["val"]["class_counts"]


def test_majority_vote_rule():
  vote = public_sets.majority_vote
  assert vote((4, 0, 0, 1, 3, 2, 0, 0, 0, 0)) == (0, None)
  assert vote((0, 0, 0, 0, 0, 0, 0, 3, 1, 1)) == (7, None)
  assert vote((3, 3, 0, 0, 0, 0, 0, 0, 0, 0)) == (None, "vote_tied")
  assert vote((0, 0, 0, 0, 0, 0, 0, 0, 4, 4)) == (None, "vote_tied")
  assert vote((1, 0, 0, 0, 0, 0, 0, 0, 0, 9)) == (None, "vote_not_a_face")
  assert vote((2, 0, 0, 0, 0, 0, 0, 0, 5, 0)) == (None, "vote_unknown")
  assert vote((0,) * 10) == (None, "malformed_row")


def test_ferplus_needs_row_aligned_fer2013(tmp_path):
  public_fixtures.write_ferplus(str(tmp_path))
  os.remove(tmp_path / "fer2013.csv")
  with pytest.raises(rows.LayoutError, match="put Kaggle's original"):
    affectnet.prepare(str(tmp_path), str(tmp_path / "o"), progress=False)
  (tmp_path / "fer2013.csv").write_text(
      "emotion,pixels,Usage\n0,1 2,Training\n")
  with pytest.raises(rows.LayoutError, match="has 17 rows but"):
    affectnet.prepare(str(tmp_path), str(tmp_path / "o"), progress=False)


@pytest.mark.parametrize("aligned", [True, False])
def test_rafdb_basic(tmp_path, aligned):
  root, out = str(tmp_path / "RAF-DB"), str(tmp_path / "out")
  want = public_fixtures.write_rafdb(root, aligned=aligned)
  assert registry.detect(root) == "rafdb"
  m = affectnet.prepare(root, out, image_size=24, progress=False)
  _check_splits(m, want)
  assert m["num_classes"] == 7 and m["dataset"] == "RAF-DB"
  kind = "aligned" if aligned else "original"
  assert m["split_sources"]["val"].endswith(f"Image/{kind}/")
  assert {m["source_label_names"][k]: m["label_names"][v]
          for k, v in m["label_mapping"].items()}["anger"] == "anger"
  ex = m["splits"]["train"]["skip_examples"]
  suffix = "_aligned" if aligned else ""
  assert ex["missing_file"][0]["path"] == f"train_00030{suffix}.jpg"
  assert ex["label_out_of_range"][0]["row"] == 29
  paths = sorted(_by_path(out, "val"))
  assert paths == [f"test_{k:04d}{suffix}.jpg" for k in range(1, 7)]
  _check_paths(out, want)


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "data_prep.affectnet", "--num_workers=1",
       "--no_progress", "--image_size=24", *args], cwd=REPO,
      capture_output=True, text=True, timeout=120)


def test_kaggle_tree_splits_test_by_the_usage_in_its_file_names(tmp_path):
  """Kaggle's FER2013 tree (train/ + test/, files named Training_*,
  PublicTest_*, PrivateTest_*): PublicTest is the holdout and PrivateTest
  val, as from fer2013.csv; a test/ image with no Usage name is a counted
  skip; the run and the manifest say where each split came from."""
  root, out = tmp_path / "fer2013", tmp_path / "out"
  want = public_fixtures.write_fer2013_folders(str(root))
  assert registry.detect(str(root)) == "folders"
  res = _cli(f"--input_dir={root}", f"--output_dir={out}")
  assert res.returncode == 0, res.stderr
  m = json.loads((out / "manifest.json").read_text())
  _check_splits(m, want)
  _check_paths(str(out), want)
  assert m["num_classes"] == 7 and m["unused_inputs"] == []
  assert m["split_sources"] == {"train": "train/",
                                "val": "test/PrivateTest_*",
                                "holdout": "test/PublicTest_*"}
  assert m["holdout"] == {"from": "test/PublicTest_*"}
  assert m["missing_splits"] == []
  ex = m["splits"]["val"]["skip_examples"]["unknown_split"][0]
  assert ex["path"] == "sad/im_extra.jpg"
  summary = res.stderr.strip().splitlines()[-1]
  assert "holdout 6" in summary and "val 10" in summary, summary
  assert ("val = test/PrivateTest_*" in summary and
          "holdout = test/PublicTest_*" in summary), summary
  assert "PublicTest_* is the holdout" in res.stderr
  assert "no Contempt class folder" in res.stderr
  # The tree's own holdout is the published protocol's: no second one.
  res = _cli(f"--input_dir={root}", f"--output_dir={tmp_path / 'o2'}",
             "--holdout_fraction=0.2")
  assert res.returncode == 1 and "own holdout" in res.stderr, res.stderr


def test_kaggle_tree_without_usage_names_reads_test_as_val(tmp_path):
  """train/ + test/ and no val/, file names without a Usage: test/ is
  prepared as 'val', the run says so, and with no Contempt folder the
  dataset has 7 classes."""
  root, out = tmp_path / "fer2013", tmp_path / "out"
  want = public_fixtures.write_fer2013_folders(str(root), usage_names=False)
  res = _cli(f"--input_dir={root}", f"--output_dir={out}")
  assert res.returncode == 0, res.stderr
  m = json.loads((out / "manifest.json").read_text())
  _check_splits(m, want)
  _check_paths(str(out), want)
  assert m["num_classes"] == 7 and m["unused_inputs"] == []
  assert m["split_sources"] == {"train": "train/", "val": "test/"}
  assert m["holdout"] is None and m["missing_splits"] == []
  summary = res.stderr.strip().splitlines()[-1]
  assert "val 16" in summary and "val = test/ (no val/)" in summary, summary
  assert "test/ is the evaluation split" in res.stderr
  # --classes=8 keeps AffectNet's 8 ids (an empty Contempt class).
  res = _cli(f"--input_dir={root}", f"--output_dir={tmp_path / 'o8'}",
             "--classes=8")
  assert res.returncode == 0, res.stderr
  m8 = json.loads((tmp_path / "o8" / "manifest.json").read_text())
  assert m8["splits"]["train"]["class_counts"] == [4, 5, 6, 7, 2, 1, 3, 0]


def test_ambiguous_trees_ask_for_layout(tmp_path):
  root = str(tmp_path)
  public_fixtures.write_fer2013_folders(root)
  public_fixtures.write_fer2013(root)
  with pytest.raises(rows.LayoutError, match="--layout=fer2013"):
    registry.detect(root)
  m = affectnet.prepare(root, str(tmp_path / "out"), layout="folders",
                        image_size=24, progress=False)
  assert m["splits"]["val"]["written"] == 10
  assert m["unused_inputs"] == ["fer2013.csv"]


def test_rafdb_numbered_folders_are_not_read_as_affectnet_codes(tmp_path):
  """RAF-DB redistributions name class folders 1-7 in RAF-DB's order; read as
  AffectNet codes, 7 (neutral) would become Contempt. Refused unless
  --folder_numbers says which numbering it is."""
  want = public_fixtures.write_rafdb_folders(str(tmp_path / "raf"))
  root = str(tmp_path / "raf" / "DATASET")
  with pytest.raises(rows.LayoutError, match="--folder_numbers=rafdb"):
    affectnet.prepare(root, str(tmp_path / "o1"), image_size=24,
                      progress=False)
  m = affectnet.prepare(root, str(tmp_path / "o2"), image_size=24,
                        folder_numbers="rafdb", progress=False)
  _check_splits(m, want)
  assert m["num_classes"] == 7
  assert m["class_folders"]["train"] == {
      "1": 3, "2": 4, "3": 5, "4": 1, "5": 2, "6": 6, "7": 0}
  _check_paths(str(tmp_path / "o2"), want)  # RAF-DB 7 = neutral, ...
  # --folder_numbers=affectnet reads them as AffectNet codes, on request.
  m = affectnet.prepare(root, str(tmp_path / "o3"), image_size=24,
                        folder_numbers="affectnet", progress=False)
  assert m["num_classes"] == 8 and m["class_folders"]["val"]["7"] == 7
