"""AffectNet's layouts, as data_prep reads them (the public sets' are in
`public_sets` and `rafdb`; `registry` lists them all).

official  `Manually_Annotated_Images/<subdir>/<file>` + `training.csv` and
          `validation.csv` (9 columns; 68 landmarks as 136 ';'-separated
          numbers in image pixels). The CSVs may also sit in
          `Manually_Annotated_file_lists/`. A header line is optional.
npy       `train_set|val_set/images/N.jpg` + `annotations/N_exp.npy`,
          `N_val.npy`, `N_aro.npy`, `N_lnd.npy` (values often stored as
          strings). Images are already face crops.
folders   `train|val/<class>/*.jpg`, class = 0-7 or a name (any case). No
          valence/arousal: written as -2 ("no value"). Without `val/`, a
          `test/` folder is the evaluation split (Kaggle's FER2013 and
          RAF-DB redistributions ship `train/` + `test/`). Kaggle's FER2013
          image tree names its `test/` files for their fer2013.csv Usage
          (`PublicTest_*`, `PrivateTest_*`): then, exactly as from the CSV,
          PublicTest is the `holdout` split and PrivateTest `val`; a file
          there with neither prefix is a counted `unknown_split` skip.

Each layout has a `detect_*(input_dir) -> bool` and an
`index_*(input_dir, split, options) -> RowIndex | None` (see `rows`).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Iterator

import numpy as np

from affectjax import data as affect_data
from affectjax import face_crop
from data_prep import labels
from data_prep import rows
from data_prep.rows import HOLDOUT, Item, LayoutError, PathRefused, ReadOptions
from data_prep.rows import Row, Skip

# Shared with predict (one definition, in affectjax).
OFFICIAL_COLUMNS = face_crop.OFFICIAL_COLUMNS
_OFFICIAL_CSV = {"train": "training.csv", "val": "validation.csv"}
_OFFICIAL_IMAGE_DIRS = ("Manually_Annotated_Images",
                        "Manually_Annotated/Manually_Annotated_Images")
_OFFICIAL_CSV_DIRS = ("", "Manually_Annotated_file_lists")
_NPY_SPLIT = {"train": "train_set", "val": "val_set"}
_FOLDER_SPLIT = {"train": ("train",), "val": ("val", "validation")}
# The evaluation split of a class tree that has no val/ (Kaggle's FER2013).
_FOLDER_TEST = ("test",)
# Kaggle's FER2013 image tree: the file-name prefix of a test/ file is its
# fer2013.csv Usage, which picks its split as the CSV's does.
FOLDER_USAGE = {"PublicTest_": HOLDOUT, "PrivateTest_": "val"}
# --folder_numbers: whose label order numeric class folders follow.
FOLDER_NUMBERS = ("auto", "affectnet", "fer2013", "rafdb")


def detect_official(input_dir: str) -> bool:
  return any(_official_csv(input_dir, s) for s in _OFFICIAL_CSV)


def detect_npy(input_dir: str) -> bool:
  return any(os.path.isdir(os.path.join(input_dir, d, "images"))
             for d in _NPY_SPLIT.values())


def detect_folders(input_dir: str) -> bool:
  return any(os.path.isdir(os.path.join(input_dir, d))
             for names in _FOLDER_SPLIT.values() for d in names + _FOLDER_TEST)


def detect(input_dir: str) -> str:
  """The AffectNet layout of `input_dir` (official, then npy, then folders:
  the first whose files are there); `registry.detect` weighs the public sets
  too."""
  for name, found in (("official", detect_official), ("npy", detect_npy),
                      ("folders", detect_folders)):
    if found(input_dir):
      return name
  raise LayoutError(f"no AffectNet layout in {input_dir}")


# ----------------------------------------------------------------- official


def _official_csv(input_dir: str, split: str) -> str | None:
  return rows.find(input_dir, [os.path.join(d, _OFFICIAL_CSV[split])
                               for d in _OFFICIAL_CSV_DIRS])


def _official_row(raw: bytes, number: int, image_root: str,
                  follow_symlinks: bool = False) -> Item:
  try:
    fields = rows.csv_fields(raw)
  except (UnicodeDecodeError, csv.Error, ValueError) as e:
    return Skip(labels.MALFORMED_ROW, number, "", f"unreadable line: {e}")
  rel = fields[0] if fields else ""
  if len(fields) != len(OFFICIAL_COLUMNS):
    return Skip(labels.MALFORMED_ROW, number, rel,
                f"expected {len(OFFICIAL_COLUMNS)} fields, got {len(fields)}")
  try:
    box = tuple(float(v) for v in fields[1:5])
    lm_text = fields[5]
    landmarks = None
    if lm_text:
      lm = np.asarray([float(v) for v in lm_text.split(";")], np.float32)
      if lm.size != 2 * affect_data.NUM_LANDMARKS:
        raise ValueError(f"{lm.size} landmark numbers, expected 136")
      landmarks = lm.reshape(affect_data.NUM_LANDMARKS, 2)
    expression = labels.parse_int(fields[6])
    valence, arousal = float(fields[7]), float(fields[8])
  except ValueError as e:
    return Skip(labels.MALFORMED_ROW, number, rel, str(e))
  if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
    return Skip(labels.BAD_FACE_BOX, number, rel, f"face box {box}")
  reason = labels.check(expression, valence, arousal, 8)
  if reason is not None:
    return Skip(reason, number, rel,
                f"expression={expression} valence={valence} arousal={arousal}")
  try:
    full = rows.resolve(image_root, rel, follow_symlinks=follow_symlinks)
  except PathRefused as e:
    return Skip(e.reason, number, rel, str(e))
  return Row(number, rel, full, expression, valence, arousal, box, landmarks)


@dataclasses.dataclass
class OfficialRows(rows.RowIndex):
  """Rows of an official CSV: the byte range of each row's line."""
  csv_path: str
  image_root: str
  starts: np.ndarray = rows.per_row()
  ends: np.ndarray = rows.per_row()
  numbers: np.ndarray = rows.per_row()  # 1-based line numbers.
  follow_symlinks: bool = False

  def __iter__(self) -> Iterator[Item]:
    for raw, n in zip(rows.read_lines(self.csv_path, self.starts, self.ends),
                      self.numbers):
      yield _official_row(raw, int(n), self.image_root, self.follow_symlinks)

  def expression_codes(self) -> np.ndarray:
    """Each row's expression column (-1 if unreadable); reads the CSV once."""
    codes = np.full(len(self), -1, np.int64)
    for i, raw in enumerate(rows.read_lines(self.csv_path, self.starts,
                                            self.ends)):
      try:
        fields = rows.csv_fields(raw)
        if len(fields) == len(OFFICIAL_COLUMNS):
          codes[i] = labels.parse_int(fields[6])
      except (UnicodeDecodeError, csv.Error, ValueError):
        pass
    return codes

  def inputs(self) -> list[str]:
    return [self.csv_path, self.image_root]


def index_official(input_dir: str, split: str,
                   options: ReadOptions = ReadOptions()
                   ) -> OfficialRows | None:
  csv_path = _official_csv(input_dir, split)
  if csv_path is None:
    return None
  image_root = rows.find(input_dir, _OFFICIAL_IMAGE_DIRS)
  if image_root is None:
    raise LayoutError(
        f"{input_dir} has {os.path.basename(csv_path)} but no image folder; "
        f"expected one of {list(_OFFICIAL_IMAGE_DIRS)}.")
  # The header (optional) names column 0.
  lines = rows.csv_lines(csv_path, OFFICIAL_COLUMNS[0])
  return OfficialRows(csv_path, image_root, lines.starts, lines.ends,
                      lines.numbers, options.follow_symlinks)


# ---------------------------------------------------------------------- npy


def _npy_value(arr: np.ndarray) -> float:
  """A scalar stored as a number or a string (e.g. array('0.53', '<U4'))."""
  return float(np.asarray(arr).reshape(-1)[0])


def _npy_landmarks(arr: np.ndarray) -> np.ndarray:
  a = np.asarray(arr)
  if a.dtype.kind in "US" and a.size == 1:  # One string "x;y;..." or "x,y".
    text = str(a.reshape(-1)[0]).replace(",", ";").strip("[] ")
    a = np.asarray([float(v) for v in text.replace(" ", ";").split(";") if v])
  a = np.asarray(a, np.float64).astype(np.float32)
  if a.size != 2 * affect_data.NUM_LANDMARKS:
    raise ValueError(f"{a.size} landmark numbers, expected 136")
  return a.reshape(affect_data.NUM_LANDMARKS, 2)


def _npy_code(path: str) -> int:
  return labels.parse_int(
      np.asarray(np.load(path, allow_pickle=False)).reshape(-1)[0])


@dataclasses.dataclass
class NpyRows(rows.RowIndex):
  """Images of `<split_dir>/images/`, each with its annotations/*.npy."""
  split_dir: str
  names: list[str] = rows.per_row()  # File names inside images/.
  numbers: np.ndarray = rows.per_row()  # 1-based position in the listing.
  follow_symlinks: bool = False

  def __iter__(self) -> Iterator[Item]:
    image_root = os.path.join(self.split_dir, "images")
    ann = os.path.join(self.split_dir, "annotations")
    for name, number in zip(self.names, self.numbers):
      number = int(number)
      rel = f"images/{name}"
      if not rows.is_image_name(name):
        yield Skip(labels.NOT_AN_IMAGE, number, rel, "not an image file name")
        continue
      try:
        full = rows.resolve(image_root, name,
                            follow_symlinks=self.follow_symlinks)
      except PathRefused as e:
        yield Skip(e.reason, number, rel, str(e))
        continue
      stem = os.path.splitext(name)[0]
      paths = {k: os.path.join(ann, f"{stem}_{k}.npy")
               for k in ("exp", "val", "aro", "lnd")}
      missing = [k for k in ("exp", "val", "aro")
                 if not os.path.exists(paths[k])]
      if missing:
        yield Skip(labels.MISSING_ANNOTATION, number, rel,
                   f"no annotations/{stem}_{{{','.join(missing)}}}.npy")
        continue
      try:
        expression = _npy_code(paths["exp"])
        valence = _npy_value(np.load(paths["val"], allow_pickle=False))
        arousal = _npy_value(np.load(paths["aro"], allow_pickle=False))
        landmarks = None
        if os.path.exists(paths["lnd"]):
          landmarks = _npy_landmarks(np.load(paths["lnd"], allow_pickle=False))
      except (ValueError, OSError, IndexError, EOFError) as e:
        yield Skip(labels.MALFORMED_ROW, number, rel,
                   f"bad annotation for {stem}: {e}")
        continue
      reason = labels.check(expression, valence, arousal, 8)
      if reason is not None:
        yield Skip(reason, number, rel, f"expression={expression} "
                   f"valence={valence} arousal={arousal}")
        continue
      yield Row(number, rel, full, expression, valence, arousal, None,
                landmarks)

  def expression_codes(self) -> np.ndarray:
    """Each image's `_exp.npy` value (-1 if absent or unreadable)."""
    ann = os.path.join(self.split_dir, "annotations")
    codes = np.full(len(self), -1, np.int64)
    for i, name in enumerate(self.names):
      try:
        codes[i] = _npy_code(os.path.join(
            ann, f"{os.path.splitext(name)[0]}_exp.npy"))
      except (ValueError, OSError, IndexError, EOFError):
        pass
    return codes

  def inputs(self) -> list[str]:
    return [self.split_dir]


def _numeric_first(name: str):
  stem = os.path.splitext(name)[0]
  return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def index_npy(input_dir: str, split: str,
              options: ReadOptions = ReadOptions()) -> NpyRows | None:
  split_dir = os.path.join(input_dir, _NPY_SPLIT[split])
  images = os.path.join(split_dir, "images")
  if not os.path.isdir(images):
    return None
  names = sorted((e.name for e in os.scandir(images) if not e.is_dir()),
                 key=_numeric_first)
  return NpyRows(split_dir, names, np.arange(1, len(names) + 1),
                 options.follow_symlinks)


# ------------------------------------------------------------------ folders


@dataclasses.dataclass
class FolderRows(rows.RowIndex):
  """Files below a split folder's class folders."""
  split_dir: str
  class_folders: dict[str, int]  # Folder name -> expression code.
  # (path relative to split_dir, class code; None = not in a class folder).
  entries: list[tuple[str, int | None]] = rows.per_row()
  numbers: np.ndarray = rows.per_row()  # 1-based position in the listing.
  follow_symlinks: bool = False
  source: str = ""  # The folder the split is read from, e.g. 'test/'.
  # Usage-named test/ (Kaggle's FER2013): the file-name prefix the split
  # reads; an image with no Usage prefix is an `unknown_split` skip.
  usage_prefix: str | None = None

  def __iter__(self) -> Iterator[Item]:
    for (rel, code), number in zip(self.entries, self.numbers):
      number = int(number)
      if not rows.is_image_name(rel):
        yield Skip(labels.NOT_AN_IMAGE, number, rel, "not an image file name")
        continue
      if (self.usage_prefix is not None and
          not os.path.basename(rel).startswith(self.usage_prefix)):
        yield Skip(labels.UNKNOWN_SPLIT, number, rel,
                   "the other files of this folder are named for their "
                   f"FER2013 Usage ({', '.join(FOLDER_USAGE)}); this name "
                   "carries none")
        continue
      if code is None:
        yield Skip(labels.MALFORMED_ROW, number, rel,
                   "image is not inside a class folder")
        continue
      reason = labels.check(code, affect_data.NO_VALUE, affect_data.NO_VALUE,
                            8)
      if reason is not None:
        yield Skip(reason, number, rel, f"class folder code {code}")
        continue
      try:
        full = rows.resolve(self.split_dir, rel,
                            follow_symlinks=self.follow_symlinks)
      except PathRefused as e:
        yield Skip(e.reason, number, rel, str(e))
        continue
      yield Row(number, rel, full, code, affect_data.NO_VALUE,
                affect_data.NO_VALUE, None, None)

  def expression_codes(self) -> np.ndarray:
    return np.asarray([-1 if c is None else c for _, c in self.entries],
                      np.int64)

  def inputs(self) -> list[str]:
    return [self.split_dir]


_NUMBERINGS = {"fer2013": labels.FER2013_MAPPING,
               "rafdb": labels.RAFDB_MAPPING}


def _numbered_class(name: str, folder_numbers: str) -> int | None:
  """A numeric class folder's code under `folder_numbers` (None: unknown)."""
  key = name.strip()
  if folder_numbers in _NUMBERINGS:
    return _NUMBERINGS[folder_numbers].get(key)
  return int(key)


def check_folder_numbers(indexes: dict, options: ReadOptions) -> None:
  """Refuses numeric class folders that look like RAF-DB's numbering.

  Folders named 1-7 with no 0 are how RAF-DB redistributions number its
  classes (1 surprise ... 7 neutral); read as AffectNet codes they would turn
  Neutral into Contempt, silently. `--folder_numbers` (anything but auto)
  says which it is.
  """
  if options.folder_numbers != "auto":
    return
  numbers = {n.strip() for idx in indexes.values()
             for n in getattr(idx, "class_folders", {}) if n.strip().isdigit()}
  if "7" in numbers and "0" not in numbers and numbers <= set("1234567"):
    raise LayoutError(
        f"The class folders are numbered {', '.join(sorted(numbers))} with "
        "no 0: that is RAF-DB's numbering (1 surprise, 2 fear, 3 disgust, "
        "4 happy, 5 sad, 6 anger, 7 neutral), not AffectNet's (0 neutral ... "
        "7 contempt). Pass --folder_numbers=rafdb, or --folder_numbers="
        "affectnet if they are AffectNet codes.")


def _folder_test_dir(input_dir: str) -> str | None:
  """test/, when it is the evaluation split (the tree has no val/)."""
  if rows.find(input_dir, _FOLDER_SPLIT["val"]) is not None:
    return None
  test = rows.find(input_dir, _FOLDER_TEST)
  return test if test is not None and os.path.isdir(test) else None


def folder_usage(input_dir: str) -> bool:
  """Whether test/ (with no val/) names its files for their FER2013 Usage.

  Kaggle's FER2013 image tree does (`PublicTest_123.jpg`,
  `PrivateTest_456.jpg`): one such image name is enough, and the split then
  follows the names; the images without one are counted skips.
  """
  test = _folder_test_dir(input_dir)
  return test is not None and any(
      os.path.basename(p).startswith(tuple(FOLDER_USAGE))
      and rows.is_image_name(p) for p in rows.files_below(test))


def folder_splits(input_dir: str) -> tuple[str, ...]:
  """The splits a class tree defines: train and val, and holdout when its
  test/ names carry FER2013's Usage."""
  if folder_usage(input_dir):
    return rows.SOURCE_SPLITS + (HOLDOUT,)
  return rows.SOURCE_SPLITS


def folder_classes(indexes: dict) -> int:
  """7 for a class tree without a Contempt folder, else 8."""
  if any(7 in idx.class_folders.values() for idx in indexes.values()):
    return 8
  return 7


def _usage_split(rel: str) -> str:
  """The split of a file in a Usage-named test/: an image named for a Usage
  goes to that Usage's split; anything else to val (skipped there)."""
  name = os.path.basename(rel)
  return next((s for p, s in FOLDER_USAGE.items()
               if name.startswith(p) and rows.is_image_name(name)), "val")


def index_folders(input_dir: str, split: str,
                  options: ReadOptions = ReadOptions()) -> FolderRows | None:
  if options.folder_numbers not in FOLDER_NUMBERS:
    raise LayoutError(f"--folder_numbers must be one of "
                      f"{', '.join(FOLDER_NUMBERS)}; got "
                      f"{options.folder_numbers!r}.")
  usage_prefix = None
  if split in (HOLDOUT, "val") and folder_usage(input_dir):
    # Kaggle's FER2013 tree: test/'s file names pick holdout and val.
    split_dir = _folder_test_dir(input_dir)
    usage_prefix = next(p for p, s in FOLDER_USAGE.items() if s == split)
  elif split == HOLDOUT:
    return None  # Only a Usage-named test/ holds one.
  else:
    split_dir = rows.find(input_dir, _FOLDER_SPLIT[split])
    if split_dir is None and split == "val":
      # Kaggle's FER2013 and RAF-DB trees: train/ + test/, no val/.
      split_dir = _folder_test_dir(input_dir)
  if split_dir is None or not os.path.isdir(split_dir):
    return None
  entries: list[tuple[str, int | None]] = []
  class_folders: dict[str, int] = {}
  for top in sorted(os.scandir(split_dir), key=lambda e: e.name):
    if not top.is_dir():
      entries.append((top.name, None))
      continue
    code = labels.folder_class(top.name)
    if code is not None and top.name.strip().isdigit():
      code = _numbered_class(top.name, options.folder_numbers)
    if code is None:
      raise LayoutError(
          f"Unknown class folder {top.path}: name class folders 0-7 or one of "
          f"{', '.join(affect_data.LABEL_NAMES_8)} (any case); numbers follow "
          f"--folder_numbers={options.folder_numbers} (fer2013: 0-6, "
          "rafdb: 1-7).")
    class_folders[top.name] = code
    # Files anywhere below a class folder belong to it; sorted for a stable
    # order independent of the file system.
    for path in rows.files_below(top.path):
      entries.append((os.path.relpath(path, split_dir), code))
  source = os.path.basename(split_dir) + "/"
  numbers = np.arange(1, len(entries) + 1)
  if usage_prefix is not None:
    # Holdout: the PublicTest_ images. Val: the PrivateTest_ images, plus
    # every other file of test/ (skipped and counted there, never dropped).
    keep = [i for i, (rel, _) in enumerate(entries)
            if _usage_split(rel) == split]
    entries = [entries[i] for i in keep]
    numbers = numbers[keep]
    source += f"{usage_prefix}*"
  return FolderRows(split_dir, class_folders, entries, numbers,
                    options.follow_symlinks, source, usage_prefix)
