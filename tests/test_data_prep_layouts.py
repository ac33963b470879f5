"""data_prep.affectnet on the npy and folders layouts, layout detection,
symlinked trees, empty splits and unused folders (through the real CLI)."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from affectjax import data as affect_data
from data_prep import affectnet
from data_prep import registry
from data_prep import rows

S = 24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _face(seed: int, size=40) -> bytes:
  a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as fp:
    fp.write(data)


def _npy(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, value)


@pytest.fixture(scope="module")
def npy_tree(tmp_path_factory):
  """train_set/val_set with string-valued annotations and every bad case."""
  root = str(tmp_path_factory.mktemp("npy"))
  expected = {}  # path -> (expression, valence, arousal)
  for split_dir, n in (("train_set", 6), ("val_set", 3)):
    for i in range(n):
      _write(f"{root}/{split_dir}/images/{i}.jpg", _face(i))
      ann = f"{root}/{split_dir}/annotations/{i}"
      expr, v, a = i % 8, round(-0.9 + 0.3 * i, 2), round(0.8 - 0.2 * i, 2)
      # AffectNet's npy redistribution stores the numbers as strings.
      _npy(f"{ann}_exp.npy", np.array(str(expr)))
      _npy(f"{ann}_val.npy", np.array(str(v)))
      _npy(f"{ann}_aro.npy", np.array(str(a)))
      _npy(f"{ann}_lnd.npy", np.array([f"{x:.1f}" for x in
                                       np.linspace(0, 39, 136)]))
      if split_dir == "train_set":
        expected[f"images/{i}.jpg"] = (expr, v, a)
  t = f"{root}/train_set"
  _write(f"{t}/images/100.jpg", _face(100))  # No annotations at all.
  _write(f"{t}/images/Thumbs.db", b"\x00" * 64)
  _write(f"{t}/images/101.jpg", b"")  # Annotated, but empty / truncated.
  _write(f"{t}/images/102.jpg", _face(102)[:300])
  for i in (101, 102):
    for k in ("exp", "val", "aro"):
      _npy(f"{t}/annotations/{i}_{k}.npy", np.array("1" if k == "exp" else
                                                    "0.5"))
  for i, (e, v, a) in {103: ("9", "0.1", "0.1"), 104: ("1", "1.7", "0"),
                       105: ("3", "-2", "-2")}.items():
    _write(f"{t}/images/{i}.jpg", _face(i))
    _npy(f"{t}/annotations/{i}_exp.npy", np.array(e))
    _npy(f"{t}/annotations/{i}_val.npy", np.array(v))
    _npy(f"{t}/annotations/{i}_aro.npy", np.array(a))
  expected["images/105.jpg"] = (3, -2.0, -2.0)  # "no value" is kept.
  _write(f"{t}/images/106.jpg", _face(106))
  _write(f"{t}/annotations/106_exp.npy", b"not a numpy file")
  _npy(f"{t}/annotations/106_val.npy", np.array("0"))
  _npy(f"{t}/annotations/106_aro.npy", np.array("0"))
  # A symlink that leaves the root (annotated, so only the path is wrong).
  _write(f"{root}/outside.jpg", _face(7))
  os.symlink(f"{root}/outside.jpg", f"{t}/images/107.jpg")
  for k in ("exp", "val", "aro"):
    _npy(f"{t}/annotations/107_{k}.npy", np.array("1"))
  skips = {"missing_annotation": 1, "not_an_image": 1, "empty_file": 1,
           "corrupt_image": 1, "label_uncertain": 1, "label_out_of_range": 1,
           "malformed_row": 1, "symlink_outside_root": 1}
  return root, expected, skips


def test_npy_layout(npy_tree, tmp_path):
  root, expected, skips = npy_tree
  assert registry.detect(root) == "npy"
  m = affectnet.prepare(root, str(tmp_path), image_size=S, progress=False)
  assert m["layout"] == "npy"
  train = m["splits"]["train"]
  assert train["skipped"] == skips
  assert train["written"] == len(expected)
  assert m["splits"]["val"]["written"] == 3
  src = affect_data.source(str(tmp_path), "train")
  got = {src[i]["path"]: src[i] for i in range(len(src))}
  assert set(got) == set(expected)
  for path, (e, v, a) in expected.items():
    ex = got[path]
    assert (ex["expression"], ex["valence"], ex["arousal"]) == (
        e, np.float32(v), np.float32(a))
    assert ex["image"].shape == (S, S, 3)
  # Already-cropped images: the whole image is resized, landmarks scaled.
  want = np.asarray(Image.open(io.BytesIO(_face(0))).resize(
      (S, S), Image.Resampling.BILINEAR))
  assert np.abs(got["images/0.jpg"]["image"].astype(int) - want).mean() < 12
  np.testing.assert_allclose(got["images/0.jpg"]["landmarks"].reshape(-1),
                             np.linspace(0, 39, 136).round(1) * S / 40,
                             rtol=1e-5, atol=1e-4)
  assert np.isnan(got["images/105.jpg"]["landmarks"]).all()


def test_npy_holdout_reads_codes_and_keeps_row_numbers(npy_tree):
  idx = registry.index_split("npy", npy_tree[0], "train")
  codes = dict(zip(idx.names, idx.expression_codes().tolist()))
  # Unreadable or absent _exp.npy: -1, so the row stays in train.
  assert codes["106.jpg"] == codes["100.jpg"] == codes["Thumbs.db"] == -1
  assert codes["3.jpg"] == 3 and codes["103.jpg"] == 9
  train, held = registry.split_holdout(idx, 0.5, seed=0)
  assert not set(train.names) & set(held.names)
  assert sorted(train.names + held.names) == sorted(idx.names)
  # Class 1 has 5 rows (1, 101, 102, 104, 107): round(2.5) = 3 held out.
  assert sorted(codes[n] for n in held.names) == [1, 1, 1, 3]
  number = dict(zip(idx.names, idx.numbers.tolist()))
  for sub in (train, held):  # Skip reports keep the listing positions.
    assert [number[n] for n in sub.names] == sub.numbers.tolist()
    assert sub.numbers.tolist() == sorted(sub.numbers.tolist())


@pytest.fixture(scope="module")
def folders_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folders"))
  names = ["Neutral", "HAPPY", "2", "surprise", "Fear", "disgust", "6",
           "Contempt"]
  expected = {}
  for code, name in enumerate(names):
    for k in range(2):
      rel = f"{name}/img_{k}.jpg"
      _write(f"{root}/train/{rel}", _face(10 * code + k))
      expected[rel] = code
    _write(f"{root}/val/{code}/v.jpg", _face(500 + code))
  _write(f"{root}/train/HAPPY/sub/deep.JPG", _face(999))
  expected["HAPPY/sub/deep.JPG"] = 1
  _write(f"{root}/train/Fear/Thumbs.db", b"\x00" * 10)
  _write(f"{root}/train/Fear/.DS_Store", b"\x00" * 10)
  _write(f"{root}/train/6/broken.jpg", b"\xff\xd8\xff garbage")
  _write(f"{root}/train/stray.jpg", _face(1))  # Not inside a class folder.
  _write(f"{root}/train/sad/empty.jpg", b"")
  _write(f"{root}/elsewhere.jpg", _face(3))
  os.symlink(f"{root}/elsewhere.jpg", f"{root}/train/sad/link.jpg")
  skips = {"not_an_image": 2, "corrupt_image": 1, "malformed_row": 1,
           "empty_file": 1, "symlink_outside_root": 1}
  return root, expected, skips


def test_folders_layout(folders_tree, tmp_path):
  root, expected, skips = folders_tree
  assert registry.detect(root) == "folders"
  m = affectnet.prepare(root, str(tmp_path), image_size=S, num_shards=2,
                        progress=False)
  train = m["splits"]["train"]
  assert train["skipped"] == skips
  assert train["written"] == len(expected)
  assert m["splits"]["val"]["written"] == 8
  src = affect_data.source(str(tmp_path), "train")
  got = {src[i]["path"]: src[i] for i in range(len(src))}
  assert {p: int(e["expression"]) for p, e in got.items()} == expected
  for ex in got.values():  # No valence/arousal in this layout: -2 = masked.
    assert ex["valence"] == -2.0 and ex["arousal"] == -2.0
    assert np.isnan(ex["landmarks"]).all()
  assert train["class_counts"] == [2, 3, 2, 2, 2, 2, 2, 2]
  assert m["class_folders"]["train"]["HAPPY"] == 1
  assert m["class_folders"]["val"]["7"] == 7
  assert m["unused_inputs"] == ["elsewhere.jpg"]


def test_folders_seven_classes_and_forced_layout(folders_tree, tmp_path):
  root = folders_tree[0]
  m = affectnet.prepare(root, str(tmp_path), layout="folders", image_size=S,
                        classes=7, progress=False)
  assert m["splits"]["train"]["skipped"]["excluded_class"] == 2
  assert m["splits"]["val"]["skipped"] == {"excluded_class": 1}
  assert m["label_names"] == list(affect_data.LABEL_NAMES_7)


def test_unknown_class_folder_is_a_clear_error(tmp_path):
  _write(f"{tmp_path}/in/train/smiling/a.jpg", _face(0))
  with pytest.raises(rows.LayoutError, match="smiling"):
    affectnet.prepare(str(tmp_path / "in"), str(tmp_path / "out"),
                      progress=False)


def test_detect_and_forced_layout_mismatch(npy_tree, folders_tree, tmp_path):
  with pytest.raises(rows.LayoutError, match="no train or val"):
    affectnet.prepare(npy_tree[0], str(tmp_path), layout="folders",
                      progress=False)
  with pytest.raises(rows.LayoutError, match="--layout"):
    registry.index_split("zip", folders_tree[0], "train")


def test_resolve_rejects_escapes(tmp_path):
  root = str(tmp_path / "root")
  os.makedirs(f"{root}/a")
  _write(f"{tmp_path}/outside/x.jpg", b"x")
  os.symlink(f"{tmp_path}/outside", f"{root}/a/link")
  assert rows.resolve(root, "a/b.jpg") == os.path.join(
      os.path.realpath(root), "a", "b.jpg")
  for follow in (False, True):
    for bad in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "",
                "a/link/../../../outside/x.jpg"):
      with pytest.raises(rows.PathRefused) as e:
        rows.resolve(root, bad, follow_symlinks=follow)
      assert e.value.reason == "path_escapes_root", bad
  with pytest.raises(rows.PathRefused, match="--follow_symlinks") as e:
    rows.resolve(root, "a/link/x.jpg")
  assert e.value.reason == "symlink_outside_root"
  assert rows.resolve(root, "a/link/x.jpg", follow_symlinks=True) == (
      os.path.join(os.path.abspath(root), "a", "link", "x.jpg"))


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "data_prep.affectnet", "--num_workers=1",
       "--no_progress", f"--image_size={S}", *args], cwd=REPO,
      capture_output=True, text=True, timeout=120)


def test_symlinked_class_tree_needs_follow_symlinks(tmp_path):
  """A folders tree assembled from symlinks (linked files and a linked class
  folder) beside an unused test/ split: without --follow_symlinks nothing can
  be written, so the run fails naming the reason and the flag; with it,
  every image is written and the unused folder is reported."""
  store, root = tmp_path / "store", tmp_path / "tree"
  for split in ("train", "val"):
    for code in (0, 1):
      for k in range(2):
        f = store / f"{split}{code}{k}.jpg"
        _write(str(f), _face(100 * code + k, size=20 if k else 40))
        os.makedirs(root / split / str(code), exist_ok=True)
        os.symlink(f, root / split / str(code) / f.name)
  _write(str(store / "sad" / "s.jpg"), _face(7))
  os.symlink(store / "sad", root / "train" / "sad")  # A linked class folder.
  _write(str(root / "test" / "0" / "t.jpg"), _face(8))
  out = tmp_path / "out"
  res = _cli(f"--input_dir={root}", f"--output_dir={out}")
  assert res.returncode == 3, res.stderr
  assert "symlink_outside_root" in res.stderr, res.stderr
  assert "--follow_symlinks" in res.stderr
  assert "'train'" in res.stderr and "0 of 5 rows" in res.stderr
  assert not (out / "manifest.json").exists()
  res = _cli(f"--input_dir={root}", f"--output_dir={out}",
             "--follow_symlinks")
  assert res.returncode == 0, res.stderr
  m = json.loads((out / "manifest.json").read_text())
  # No Contempt folder: the dataset's own 7 classes.
  assert m["splits"]["train"]["class_counts"] == [2, 2, 1, 0, 0, 0, 0]
  assert m["splits"]["val"]["written"] == 4
  assert m["splits"]["train"]["skipped"] == {}
  assert m["unused_inputs"] == ["test/"]
  summary = res.stderr.strip().splitlines()[-1]
  assert "not used: test/" in summary, summary
  # The 20 px sources were upscaled to 24 px, and that is reported.
  assert (m["splits"]["train"]["upscaled"],
          m["splits"]["train"]["min_source_side"]) == (2, 20)
  assert "2 upscaled" in summary or "4 upscaled" in summary, summary


def test_empty_split_exits_nonzero_naming_the_reason(tmp_path):
  root = tmp_path / "in"
  _write(str(root / "train" / "happy" / "a.jpg"), _face(1))
  _write(str(root / "val" / "happy" / "broken.jpg"), b"\xff\xd8 not a jpeg")
  res = _cli(f"--input_dir={root}", f"--output_dir={tmp_path / 'out'}")
  assert res.returncode == 3, res.stderr
  assert "split 'val'" in res.stderr and "corrupt_image" in res.stderr
  assert "broken.jpg" in res.stderr
  assert not (tmp_path / "out" / "manifest.json").exists()
  # A split with no rows at all fails before any conversion.
  os.remove(root / "val" / "happy" / "broken.jpg")
  with pytest.raises(affectnet.EmptySplitError, match="'val' has no rows"):
    affectnet.prepare(str(root), str(tmp_path / "out"), image_size=S,
                      progress=False)


@pytest.mark.parametrize("module", ["data_prep.affectnet",
                                    "data_prep.prepare"])
def test_cli_flags_are_absl(tmp_path, module):
  """The documented entry point (a shim) and the driver itself are the same
  program, with the same flags in --help."""
  res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert res.returncode in (0, 1), res.stderr  # absl's --help exits 1.
  assert res.stdout.startswith("The data_prep driver"), res.stdout[:200]
  for flag in ("--input_dir", "--image_size", "--holdout_fraction",
               "--holdout_seed", "--[no]follow_symlinks", "--classes",
               "(default: '320')", "ferplus_folders"):
    assert flag in res.stdout, flag
  if module == "data_prep.prepare":
    return
  res = subprocess.run([sys.executable, "-m", "data_prep.affectnet",
                        "--helpfull"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert res.returncode in (0, 1) and "--verbosity" in res.stdout
  res = _cli("--input_dir=x", f"--output_dir={tmp_path}", "--classes=6")
  assert res.returncode == 1 and "--classes" in res.stderr, res.stderr
