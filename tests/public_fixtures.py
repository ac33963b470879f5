"""Tiny copies of the public expression sets in their published form.

Each writer makes a few real rows in the file layout, column order, file
names and quirks of the real release, plus the bad rows a test must see
skipped, and returns what preparing it must give (per split: rows written,
skips by reason, class counts in affectjax's ids):

* `write_fer2013`: Kaggle's `fer2013.csv` (`emotion,pixels,Usage`, 48x48
  pixels as 2304 space-separated numbers, Training/PublicTest/PrivateTest).
* `write_ferplus`: Microsoft's `fer2013new.csv` (`Usage,Image name,neutral,
  happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF`, image
  names `fer0000000.png` by row, empty names for the faces FERPlus removed)
  beside the matching `fer2013.csv`.
* `write_rafdb`: RAF-DB basic (`basic/EmoLabel/list_patition_label.txt`,
  `basic/Image/aligned/train_00001_aligned.jpg` 100x100, or
  `basic/Image/original/`).
* `write_fer2013_folders`: Kaggle's image release of FER2013 (`train/` and
  `test/`, class folders `angry` ... `surprise`, 48x48 grayscale JPEGs named
  `Training_<id>.jpg`, `PublicTest_<id>.jpg`, `PrivateTest_<id>.jpg`).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

SIDE = 48
# affectjax ids: 0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust,
# 6 anger, 7 contempt.
FER2013_TO_ID = {0: 6, 1: 5, 2: 4, 3: 1, 4: 2, 5: 3, 6: 0}
RAFDB_TO_ID = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 0}


def face_pixels(seed: int, side: int = SIDE) -> np.ndarray:
  """A deterministic uint8 (side, side) grayscale 'face'."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:side, :side]
  base = (x * 3 + y * 2 + seed * 17) % 256
  return np.clip(base + rng.integers(-20, 20, (side, side)), 0, 255).astype(
      np.uint8)


def pixel_string(pixels: np.ndarray) -> str:
  return " ".join(str(int(v)) for v in pixels.reshape(-1))


def _write(path: str, data: bytes | str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as fp:
    fp.write(data.encode() if isinstance(data, str) else data)


def _jpeg(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _counts(ids, n=8):
  c = [0] * n
  for i in ids:
    c[i] += 1
  return c


# FER2013 Training rows per label, a different count for each label (0 angry
# ... 6 neutral) so that two swapped classes show in the counts.
_FER2013_TRAIN = {0: 3, 1: 1, 2: 2, 3: 6, 4: 4, 5: 5, 6: 7}


def write_fer2013(root: str) -> dict:
  """`root/fer2013.csv`; returns the expected result per split, the class
  counts written out by hand in affectjax's ids (0 neutral, 1 happy, 2 sad,
  3 surprise, 4 fear, 5 disgust, 6 anger), and `faces`: line -> (id,
  pixels) for every written row."""
  rows = []  # (emotion text, pixel text, Usage)
  pixels = {}
  for label, count in _FER2013_TRAIN.items():
    for _ in range(count):
      pixels[len(rows)] = face_pixels(len(rows))
      rows.append((str(label), pixel_string(pixels[len(rows)]), "Training"))
  short = pixel_string(face_pixels(50))[:-4]  # 2303 values.
  rows.append(("3", short, "Training"))  # malformed_row
  rows.append(("7", pixel_string(face_pixels(51)), "Training"))  # out of range
  bad = pixel_string(face_pixels(52)).split()
  bad[5] = "300"
  rows.append(("4", " ".join(bad), "Training"))  # malformed_row (value)
  rows.append(("2", pixel_string(face_pixels(53)), "Validation"))  # unknown
  for label in (3, 3, 6):
    pixels[len(rows)] = face_pixels(100 + len(rows))
    rows.append((str(label), pixel_string(pixels[len(rows)]), "PublicTest"))
  for label in (0, 0, 1, 2, 2, 2, 3):
    pixels[len(rows)] = face_pixels(200 + len(rows))
    rows.append((str(label), pixel_string(pixels[len(rows)]), "PrivateTest"))
  text = "emotion,pixels,Usage\n" + "".join(
      f"{e},{p},{u}\n" for e, p, u in rows)
  _write(os.path.join(root, "fer2013.csv"), text)
  # Line number (header = line 1) -> (affectjax id, pixels) of written rows.
  faces = {i + 2: (FER2013_TO_ID[int(rows[i][0])], pixels[i])
           for i in pixels}
  return {
      "train": {"rows": 32, "written": 28,
                "skipped": {"label_out_of_range": 1, "malformed_row": 2,
                            "unknown_split": 1},
                #               neu hap sad sur fea dis ang
                "class_counts": [7, 6, 4, 5, 2, 1, 3]},
      "holdout": {"rows": 3, "written": 3, "skipped": {},
                  "class_counts": [1, 2, 0, 0, 0, 0, 0]},
      "val": {"rows": 7, "written": 7, "skipped": {},
              "class_counts": [0, 1, 0, 0, 3, 1, 2]},
      "faces": faces,
  }


# fer2013new.csv rows: (Usage, has name, votes over neutral, happiness,
# surprise, sadness, anger, disgust, fear, contempt, unknown, NF) and the
# expected outcome (an affectjax id, or the skip reason).
_FERPLUS_ROWS = [
    ("Training", True, (4, 0, 0, 1, 3, 2, 0, 0, 0, 0), 0),
    ("Training", True, (6, 0, 1, 1, 0, 0, 0, 0, 2, 0), 0),
    ("Training", True, (0, 9, 0, 0, 0, 0, 0, 0, 1, 0), 1),
    ("Training", True, (0, 0, 0, 0, 2, 0, 0, 6, 2, 0), 7),
    ("Training", True, (0, 5, 5, 0, 0, 0, 0, 0, 0, 0), "vote_tied"),
    ("Training", True, (0, 0, 0, 0, 0, 0, 0, 0, 0, 10), "vote_not_a_face"),
    ("Training", True, (1, 0, 0, 2, 0, 0, 0, 0, 7, 0), "vote_unknown"),
    ("Training", False, (0, 0, 0, 0, 0, 0, 0, 0, 0, 10),
     "dropped_by_ferplus"),
    ("Training", False, (1, 0, 0, 0, 0, 0, 0, 0, 0, 9), "dropped_by_ferplus"),
    ("PublicTest", True, (0, 0, 8, 0, 0, 0, 2, 0, 0, 0), 3),
    ("PublicTest", True, (0, 1, 0, 0, 0, 0, 9, 0, 0, 0), 4),
    ("PrivateTest", True, (2, 0, 0, 7, 0, 0, 0, 1, 0, 0), 2),
    ("PrivateTest", True, (0, 0, 0, 0, 10, 0, 0, 0, 0, 0), 6),
    ("PrivateTest", True, (0, 0, 0, 0, 3, 6, 0, 0, 1, 0), 5),
    ("PublicTest", True, (0, 0, 7, 0, 0, 0, 3, 0, 0, 0), 3),
    ("PrivateTest", True, (0, 0, 0, 0, 8, 0, 0, 0, 2, 0), 6),
    ("PrivateTest", True, (1, 0, 0, 0, 6, 0, 0, 3, 0, 0), 6),
]
# What those rows give, per split, in affectjax's ids, written out by hand:
#                 neu hap sad sur fea dis ang con
FERPLUS_COUNTS = {"train": [2, 1, 0, 0, 0, 0, 0, 1],
                  "holdout": [0, 0, 0, 2, 1, 0, 0, 0],
                  "val": [0, 0, 1, 0, 0, 1, 3, 0]}
FERPLUS_HEADER = ("Usage,Image name,neutral,happiness,surprise,sadness,anger,"
                  "disgust,fear,contempt,unknown,NF")


def write_ferplus(root: str) -> dict:
  """`root/fer2013new.csv` + `root/fer2013.csv`; returns the expectations."""
  fer = ["emotion,pixels,Usage"]
  new = [FERPLUS_HEADER]
  splits = {"Training": "train", "PublicTest": "holdout",
            "PrivateTest": "val"}
  want = {s: {"rows": 0, "written": 0, "skipped": {}, "ids": []}
          for s in splits.values()}
  faces = {}
  for i, (usage, named, votes, outcome) in enumerate(_FERPLUS_ROWS):
    px = face_pixels(300 + i)
    # FER2013's own label (ignored by FERPlus) in the paired row.
    fer.append(f"{i % 7},{pixel_string(px)},{usage}")
    name = f"fer{i:07d}.png" if named else ""
    new.append(",".join([usage, name] + [str(v) for v in votes]))
    w = want[splits[usage]]
    w["rows"] += 1
    if isinstance(outcome, int):
      w["written"] += 1
      w["ids"].append(outcome)
      faces[name] = (outcome, px)
    else:
      w["skipped"][outcome] = w["skipped"].get(outcome, 0) + 1
  _write(os.path.join(root, "fer2013.csv"), "\n".join(fer) + "\n")
  _write(os.path.join(root, "fer2013new.csv"), "\n".join(new) + "\n")
  for w in want.values():
    w["class_counts"] = _counts(w.pop("ids"))
    w["skipped"] = dict(sorted(w["skipped"].items()))
  want["faces"] = faces
  return want


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def write_ferplus_folders(root: str) -> dict:
  """FERPlus's image folders as its generate_training_data.py writes them:
  `root/FER2013Train/`, `FER2013Valid/`, `FER2013Test/`, each with 48x48
  grayscale PNGs `fer<row:07d>.png` and a `label.csv` without a header,
  rows `fer0000000.png,"(0, 0, 48, 48)",4,0,0,1,3,2,0,0,0,0`. The faces
  FERPlus removed are not listed. Plus, in train: a row whose image is
  missing, one with 9 votes, and one with a box that is not a box."""
  folders = {"Training": "FER2013Train", "PublicTest": "FER2013Valid",
             "PrivateTest": "FER2013Test"}
  splits = {"Training": "train", "PublicTest": "holdout",
            "PrivateTest": "val"}
  lines = {f: [] for f in folders.values()}
  want = {s: {"rows": 0, "written": 0, "skipped": {}, "ids": []}
          for s in splits.values()}
  faces = {}
  for i, (usage, named, votes, outcome) in enumerate(_FERPLUS_ROWS):
    if not named:
      continue  # generate_training_data.py leaves them out.
    name = f"fer{i:07d}.png"
    px = face_pixels(700 + i)
    _write(os.path.join(root, folders[usage], name), _png(px))
    lines[folders[usage]].append(
        f'{name},"(0, 0, 48, 48)",' + ",".join(str(v) for v in votes))
    w = want[splits[usage]]
    w["rows"] += 1
    if isinstance(outcome, int):
      w["written"] += 1
      w["ids"].append(outcome)
      faces[name] = (outcome, px)
    else:
      w["skipped"][outcome] = w["skipped"].get(outcome, 0) + 1
  lines["FER2013Train"] += [
      'fer0000090.png,"(0, 0, 48, 48)",0,9,0,0,0,0,0,0,1,0',  # missing_file
      'fer0000091.png,"(0, 0, 48, 48)",0,9,0,0,0,0,0,0,1',  # malformed_row
      'fer0000092.png,"(0, 0, 48)",0,9,0,0,0,0,0,0,1,0',  # bad_face_box
  ]
  for n in (91, 92):
    _write(os.path.join(root, "FER2013Train", f"fer00000{n}.png"),
           _png(face_pixels(n)))
  train = want["train"]
  train["rows"] += 3
  for reason in ("missing_file", "malformed_row", "bad_face_box"):
    train["skipped"][reason] = 1
  for folder, rows in lines.items():
    _write(os.path.join(root, folder, "label.csv"), "\n".join(rows) + "\n")
  for w in want.values():
    w["class_counts"] = _counts(w.pop("ids"))
    w["skipped"] = dict(sorted(w["skipped"].items()))
  want["faces"] = faces
  return want


# RAF-DB basic: train images per label (1 surprise, 2 fear, 3 disgust,
# 4 happy, 5 sad, 6 anger, 7 neutral), a different count for each label;
# and the test images' labels.
_RAFDB_TRAIN = {1: 3, 2: 1, 3: 2, 4: 7, 5: 4, 6: 5, 7: 6}
_RAFDB_TEST = (1, 1, 4, 7, 7, 7)


def write_rafdb(root: str, *, aligned: bool = True) -> dict:
  """RAF-DB basic under `root/basic`; returns the expectations, written out
  by hand in affectjax's ids, and `paths`: {split: {path: id}}."""
  base = os.path.join(root, "basic")
  lines = []
  k = 0
  for label, count in _RAFDB_TRAIN.items():
    for _ in range(count):
      k += 1
      lines.append(f"train_{k:05d}.jpg {label}")
  lines.append("train_00029.jpg 8")  # label_out_of_range (image exists)
  lines.append("train_00030.jpg 3")  # missing_file (no image)
  for k, label in enumerate(_RAFDB_TEST, start=1):
    lines.append(f"test_{k:04d}.jpg {label}")
  names = [l.split()[0] for l in lines if not l.startswith("train_00030")]
  for n, name in enumerate(names):
    img = np.stack([face_pixels(400 + n, 100)] * 3, axis=-1)
    stem = os.path.splitext(name)[0]
    if aligned:
      path = os.path.join(base, "Image", "aligned", f"{stem}_aligned.jpg")
    else:
      path = os.path.join(base, "Image", "original", name)
    _write(path, _jpeg(img))
  _write(os.path.join(base, "EmoLabel", "list_patition_label.txt"),
         "\n".join(lines) + "\n")
  suffix = "_aligned" if aligned else ""
  return {
      "train": {"rows": 30, "written": 28,
                "skipped": {"label_out_of_range": 1, "missing_file": 1},
                #               neu hap sad sur fea dis ang
                "class_counts": [6, 7, 4, 3, 1, 2, 5]},
      "val": {"rows": 6, "written": 6, "skipped": {},
              "class_counts": [3, 1, 0, 2, 0, 0, 0]},
      "paths": {
          "train": {f"train_{k:05d}{suffix}.jpg": i for k, i in (
              (1, 3), (4, 4), (6, 5), (13, 1), (14, 2), (22, 6), (28, 0))},
          "val": {f"test_{k:04d}{suffix}.jpg": i for k, i in (
              (2, 3), (3, 1), (4, 0))}},
  }


KAGGLE_FOLDERS = ("angry", "disgust", "fear", "happy", "neutral", "sad",
                  "surprise")
# Kaggle's FER2013 image tree: images per (folder, class folder, Usage), a
# different count for every class so that two swapped classes show.
_KAGGLE_TREE = {
    "train": {"angry": 3, "disgust": 1, "fear": 2, "happy": 5, "neutral": 4,
              "sad": 6, "surprise": 7},
    "PublicTest": {"angry": 2, "happy": 1, "surprise": 3},
    "PrivateTest": {"disgust": 1, "fear": 4, "neutral": 2, "sad": 3},
}


def write_fer2013_folders(root: str, *, usage_names: bool = True) -> dict:
  """Kaggle's FER2013 image tree: `train/<class>/Training_<id>.jpg` and
  `test/<class>/PublicTest_<id>.jpg` or `PrivateTest_<id>.jpg` (48x48
  grayscale JPEGs), plus a `desktop.ini` in train/happy/.

  With `usage_names`, test/ also holds `sad/im_extra.jpg`, an image whose
  name carries no Usage. Without, test/'s files are named `im<id>.jpg` (a
  tree that does not carry the Usage) and test/ is the evaluation split.

  Returns what preparing it must give, every number written out by hand in
  affectjax's ids (0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear,
  5 disgust, 6 anger), and `paths`: {split: {path: id}} for some images.
  """
  n = 0
  for usage, per_class in _KAGGLE_TREE.items():
    top = "train" if usage == "train" else "test"
    prefix = "Training" if usage == "train" else usage
    for folder, count in per_class.items():
      for _ in range(count):
        name = (f"{prefix}_{10000000 + n}.jpg"
                if usage_names or top == "train" else f"im{n}.jpg")
        _write(os.path.join(root, top, folder, name),
               _jpeg(face_pixels(500 + n)))
        n += 1
  _write(os.path.join(root, "train", "happy", "desktop.ini"), b"[x]\n")
  train = {"rows": 29, "written": 28, "skipped": {"not_an_image": 1},
           #               neu hap sad sur fea dis ang
           "class_counts": [4, 5, 6, 7, 2, 1, 3]}
  if not usage_names:
    return {"train": train,
            "val": {"rows": 16, "written": 16, "skipped": {},
                    "class_counts": [2, 1, 3, 3, 4, 1, 2]},
            "paths": {"val": {"angry/im28.jpg": 6, "neutral/im40.jpg": 0,
                              "sad/im42.jpg": 2, "surprise/im31.jpg": 3}}}
  _write(os.path.join(root, "test", "sad", "im_extra.jpg"),
         _jpeg(face_pixels(499)))
  return {
      "train": train,
      "holdout": {"rows": 6, "written": 6, "skipped": {},
                  "class_counts": [0, 1, 0, 3, 0, 0, 2]},
      "val": {"rows": 11, "written": 10, "skipped": {"unknown_split": 1},
              "class_counts": [2, 0, 3, 0, 4, 1, 0]},
      "paths": {
          "train": {"angry/Training_10000000.jpg": 6,
                    "disgust/Training_10000003.jpg": 5,
                    "surprise/Training_10000027.jpg": 3},
          "holdout": {"angry/PublicTest_10000028.jpg": 6,
                      "happy/PublicTest_10000030.jpg": 1,
                      "surprise/PublicTest_10000033.jpg": 3},
          "val": {"disgust/PrivateTest_10000034.jpg": 5,
                  "fear/PrivateTest_10000035.jpg": 4,
                  "sad/PrivateTest_10000043.jpg": 2}},
  }


def write_rafdb_folders(root: str) -> dict:
  """A Kaggle redistribution of RAF-DB: `DATASET/train/<1-7>/` and
  `DATASET/test/<1-7>/` (RAF-DB's label numbers as folder names), aligned
  100x100 faces named as in RAF-DB. Folder L holds L images in train and
  8 - L in test, so every class has its own count."""
  n = 0
  for split, prefix in (("train", "train_"), ("test", "test_")):
    for label in range(1, 8):
      for _ in range(label if split == "train" else 8 - label):
        n += 1
        name = f"{prefix}{n:05d}_aligned.jpg"
        img = np.stack([face_pixels(600 + n, 100)] * 3, axis=-1)
        _write(os.path.join(root, "DATASET", split, str(label), name),
               _jpeg(img))
  return {
      #                                                neu hap sad sur fea dis ang
      "train": {"rows": 28, "written": 28, "skipped": {},
                "class_counts": [7, 4, 5, 1, 2, 3, 6]},
      "val": {"rows": 28, "written": 28, "skipped": {},
              "class_counts": [1, 4, 3, 7, 6, 5, 2]},
      "paths": {"train": {"1/train_00001_aligned.jpg": 3,
                          "2/train_00003_aligned.jpg": 4,
                          "7/train_00028_aligned.jpg": 0},
                "val": {"1/test_00029_aligned.jpg": 3,
                        "6/test_00055_aligned.jpg": 6,
                        "7/test_00056_aligned.jpg": 0}},
  }
