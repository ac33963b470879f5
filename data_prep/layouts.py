"""The AffectNet layouts data_prep reads, and how each becomes a row stream.

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
fer2013, ferplus, ferplus_folders, rafdb
          The public expression sets, as published: see `public_sets`.

Paths. A path that a CSV row (or a file name) makes leave its root (`..`,
absolute) is never opened (`path_escapes_root`). A symlink placed in the
tree that points outside the root is refused too (`symlink_outside_root`)
unless `follow_symlinks` is set: datasets assembled from symlinks are common,
but following them is the user's explicit choice (`--follow_symlinks`).

Each split is first *indexed* cheaply (CSV line offsets or a sorted file
list; no image is opened), so that shard i is always the same contiguous
block of rows whatever the worker count, which is what makes a resumed run
identical to an uninterrupted one. A block (`Part`) is small and picklable;
iterating it yields `Row`s to convert or `Skip`s to count.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Iterator, Sequence, Union

import numpy as np

from affectjax import data as affect_data
from affectjax import face_crop
from data_prep import labels

LAYOUTS = ("official", "npy", "folders", "fer2013", "ferplus",
           "ferplus_folders", "rafdb")
# Splits a source tree can hold; `holdout` is carved out of `train` (see
# `split_holdout`), never read from the input.
SOURCE_SPLITS = ("train", "val")
HOLDOUT = "holdout"
# Shared with predict (one definition, in affectjax).
IMAGE_EXTENSIONS = face_crop.IMAGE_EXTENSIONS
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


@dataclasses.dataclass
class Row:
  """One face to convert. Coordinates are source-image pixels."""
  number: int  # 1-based CSV line, or 1-based position in the file listing.
  path: str  # As the source names it (relative to the image root).
  file: str  # Absolute file path, already checked by `resolve`.
  expression: int
  valence: float
  arousal: float
  box: tuple[float, float, float, float] | None  # x, y, w, h; None = whole.
  landmarks: np.ndarray | None  # (68, 2) or None.
  # The encoded image itself, for sources that store pixels in the
  # annotation file (FER2013's CSV); None = read `file`.
  image: bytes | None = None


@dataclasses.dataclass
class Skip:
  """A row or file that is not written, and why."""
  reason: str
  number: int
  path: str
  detail: str = ""


Item = Union[Row, Skip]


class LayoutError(ValueError):
  """The input directory does not look like the requested layout."""


class PathRefused(ValueError):
  """A row's path is not read; `reason` is the skip-reason key."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _inside(root: str, path: str) -> bool:
  return os.path.commonpath([root, path]) == root


def resolve(root: str, rel: str, *, follow_symlinks: bool = False) -> str:
  """The file to read for `root/rel`; raises PathRefused if it is not read.

  `rel` itself must stay inside `root` (no absolute path, no `..` that climbs
  out): otherwise `path_escapes_root`, whatever `follow_symlinks` says, since
  a CSV row must never point the reader elsewhere. `..` is resolved on the
  string, and the returned path is the one checked. Without
  `follow_symlinks`, the file's real path (after symlinks) must stay inside
  the real root too, else `symlink_outside_root`. A file whose name differs
  only in extension case is found (see `find_case_variant`). Only paths are
  examined here (stat, never open), so a refused file is never read.
  """
  if not rel or os.path.isabs(rel) or "\x00" in rel:
    raise PathRefused(labels.PATH_ESCAPES_ROOT,
                      f"path {rel!r} is empty or absolute; paths are read "
                      f"relative to {root}")
  root_abs = os.path.abspath(root)
  lexical = os.path.normpath(os.path.join(root_abs, rel))
  if not _inside(root_abs, lexical):
    raise PathRefused(labels.PATH_ESCAPES_ROOT,
                      f"path {rel!r} leaves {root}")
  path = find_case_variant(lexical) or lexical
  if follow_symlinks:
    return path
  real = os.path.realpath(path)
  if not _inside(os.path.realpath(root_abs), real):
    raise PathRefused(labels.SYMLINK_OUTSIDE_ROOT,
                      f"{rel} is a symlink to {real}, outside {root}; pass "
                      "--follow_symlinks to follow symlinks in your tree")
  return real


def find_case_variant(path: str) -> str | None:
  """AffectNet mixes `.jpg` and `.JPG`: find the file if only case differs."""
  if os.path.exists(path):
    return path
  stem, ext = os.path.splitext(path)
  for alt in {ext.lower(), ext.upper(), ".jpg", ".JPG", ".jpeg", ".JPEG",
              ".png", ".PNG"}:
    if os.path.exists(stem + alt):
      return stem + alt
  return None


def _find(input_dir: str, candidates: Sequence[str]) -> str | None:
  for c in candidates:
    p = os.path.join(input_dir, c)
    if os.path.exists(p):
      return p
  return None


def detect(input_dir: str) -> str:
  """Returns the layout name of `input_dir` (see module docstring).

  A public set's marker file (fer2013.csv, fer2013new.csv, RAF-DB's label
  list) beside another layout's files is ambiguous: the error asks for
  --layout rather than guessing.
  """
  if not os.path.isdir(input_dir):
    raise LayoutError(f"--input_dir={input_dir} is not a directory.")
  from data_prep import public_sets  # pylint: disable=g-import-not-at-top
  public = public_sets.detect(input_dir)
  try:
    other = [_detect_affectnet(input_dir)]
  except LayoutError:
    other = []
  found = public + other
  if len(found) > 1:
    raise LayoutError(
        f"{input_dir} holds the files of several layouts ({', '.join(found)}"
        f"); pass --layout={found[0]} (or one of the others) to choose.")
  if found:
    return found[0]
  raise LayoutError(
      f"Cannot detect the layout of {input_dir}: expected "
      "training.csv/validation.csv + Manually_Annotated_Images/ (official), "
      "train_set/images + train_set/annotations (npy), train/<class>/ "
      "(folders), fer2013.csv (fer2013), fer2013new.csv + fer2013.csv "
      "(ferplus), FER2013Train/label.csv (ferplus_folders) or "
      "EmoLabel/list_patition_label.txt (rafdb). Pass --layout to force one.")


def _detect_affectnet(input_dir: str) -> str:
  """The AffectNet layout (official, npy or folders) of `input_dir`."""
  for name in _OFFICIAL_CSV.values():
    if _find(input_dir, [os.path.join(d, name) for d in _OFFICIAL_CSV_DIRS]):
      return "official"
  if any(os.path.isdir(os.path.join(input_dir, d, "images"))
         for d in _NPY_SPLIT.values()):
    return "npy"
  if any(os.path.isdir(os.path.join(input_dir, d))
         for names in _FOLDER_SPLIT.values() for d in names + _FOLDER_TEST):
    return "folders"
  raise LayoutError(f"no AffectNet layout in {input_dir}")


# ----------------------------------------------------------------- official


@dataclasses.dataclass
class OfficialPart:
  """Rows of one shard of an official CSV: byte ranges of its lines."""
  csv_path: str
  image_root: str
  starts: np.ndarray  # Byte offset where each row's line starts.
  ends: np.ndarray  # Byte offset just past each row's line.
  numbers: np.ndarray  # 1-based line numbers (for error reports).
  follow_symlinks: bool = False

  def __iter__(self) -> Iterator[Item]:
    if not len(self.starts):
      return
    # One read for the whole block (rows are in file order; lines of rows
    # that belong to another split, e.g. the holdout, are read and ignored).
    with open(self.csv_path, "rb") as fp:
      fp.seek(int(self.starts[0]))
      block = fp.read(int(self.ends[-1] - self.starts[0]))
    base = int(self.starts[0])
    for s, e, n in zip(self.starts, self.ends, self.numbers):
      yield _official_row(block[s - base:e - base], int(n), self.image_root,
                          self.follow_symlinks)


def _official_fields(raw: bytes) -> list[str]:
  line = raw.decode("utf-8").strip("\r\n\ufeff")
  (fields,) = list(csv.reader([line]))
  return fields


def _official_row(raw: bytes, number: int, image_root: str,
                  follow_symlinks: bool = False) -> Item:
  try:
    fields = _official_fields(raw)
  except (UnicodeDecodeError, csv.Error, ValueError) as e:
    return Skip(labels.MALFORMED_ROW, number, "", f"unreadable line: {e}")
  rel = fields[0].strip() if fields else ""
  if len(fields) != len(OFFICIAL_COLUMNS):
    return Skip(labels.MALFORMED_ROW, number, rel,
                f"expected {len(OFFICIAL_COLUMNS)} fields, got {len(fields)}")
  try:
    box = tuple(float(v) for v in fields[1:5])
    lm_text = fields[5].strip()
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
    full = resolve(image_root, rel, follow_symlinks=follow_symlinks)
  except PathRefused as e:
    return Skip(e.reason, number, rel, str(e))
  return Row(number, rel, full, expression, valence, arousal, box, landmarks)


@dataclasses.dataclass
class OfficialIndex:
  csv_path: str
  image_root: str
  starts: np.ndarray
  ends: np.ndarray
  numbers: np.ndarray
  follow_symlinks: bool = False

  def __len__(self) -> int:
    return len(self.starts)

  def part(self, start: int, stop: int) -> OfficialPart:
    return OfficialPart(self.csv_path, self.image_root, self.starts[start:stop],
                        self.ends[start:stop], self.numbers[start:stop],
                        self.follow_symlinks)

  def subset(self, positions: np.ndarray) -> "OfficialIndex":
    """The rows at `positions` (increasing), keeping their line numbers."""
    return dataclasses.replace(self, starts=self.starts[positions],
                               ends=self.ends[positions],
                               numbers=self.numbers[positions])

  def expression_codes(self) -> np.ndarray:
    """Each row's expression column (-1 if unreadable); reads the CSV once."""
    codes = np.full(len(self), -1, np.int64)
    with open(self.csv_path, "rb") as fp:
      for i, (s, e) in enumerate(zip(self.starts, self.ends)):
        fp.seek(int(s))
        try:
          fields = _official_fields(fp.read(int(e - s)))
          if len(fields) == len(OFFICIAL_COLUMNS):
            codes[i] = labels.parse_int(fields[6])
        except (UnicodeDecodeError, csv.Error, ValueError):
          pass
    return codes

  def inputs(self) -> list[str]:
    return [self.csv_path, self.image_root]


def _index_official(input_dir: str, split: str,
                    follow_symlinks: bool = False) -> OfficialIndex | None:
  csv_path = _find(input_dir, [os.path.join(d, _OFFICIAL_CSV[split])
                               for d in _OFFICIAL_CSV_DIRS])
  if csv_path is None:
    return None
  image_root = _find(input_dir, _OFFICIAL_IMAGE_DIRS)
  if image_root is None:
    raise LayoutError(
        f"{input_dir} has {os.path.basename(csv_path)} but no image folder; "
        f"expected one of {list(_OFFICIAL_IMAGE_DIRS)}.")
  starts, ends, numbers = [], [], []
  offset = 0
  with open(csv_path, "rb") as fp:
    for number, line in enumerate(fp, start=1):
      stripped = line.strip()
      # Blank lines are not rows. The header (optional) names column 0.
      if stripped and not (number == 1 and stripped.lstrip(
          b"\xef\xbb\xbf").startswith(b"subDirectory_filePath")):
        starts.append(offset)
        ends.append(offset + len(line))
        numbers.append(number)
      offset += len(line)
  return OfficialIndex(csv_path, image_root, np.asarray(starts, np.int64),
                       np.asarray(ends, np.int64),
                       np.asarray(numbers, np.int64), follow_symlinks)


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
class NpyPart:
  split_dir: str
  names: Sequence[str]  # File names inside images/.
  numbers: Sequence[int]
  follow_symlinks: bool = False

  def __iter__(self) -> Iterator[Item]:
    image_root = os.path.join(self.split_dir, "images")
    ann = os.path.join(self.split_dir, "annotations")
    for name, number in zip(self.names, self.numbers):
      number = int(number)
      rel = f"images/{name}"
      if not is_image_name(name):
        yield Skip(labels.NOT_AN_IMAGE, number, rel, "not an image file name")
        continue
      try:
        full = resolve(image_root, name, follow_symlinks=self.follow_symlinks)
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


@dataclasses.dataclass
class NpyIndex:
  split_dir: str
  names: list[str]
  numbers: np.ndarray  # 1-based position in the sorted file listing.
  follow_symlinks: bool = False

  def __len__(self) -> int:
    return len(self.names)

  def part(self, start: int, stop: int) -> NpyPart:
    return NpyPart(self.split_dir, self.names[start:stop],
                   self.numbers[start:stop].tolist(), self.follow_symlinks)

  def subset(self, positions: np.ndarray) -> "NpyIndex":
    return dataclasses.replace(self, names=[self.names[i] for i in positions],
                               numbers=self.numbers[positions])

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


def _index_npy(input_dir: str, split: str,
               follow_symlinks: bool = False) -> NpyIndex | None:
  split_dir = os.path.join(input_dir, _NPY_SPLIT[split])
  images = os.path.join(split_dir, "images")
  if not os.path.isdir(images):
    return None
  names = sorted((e.name for e in os.scandir(images) if not e.is_dir()),
                 key=_numeric_first)
  return NpyIndex(split_dir, names, np.arange(1, len(names) + 1),
                  follow_symlinks)


# ------------------------------------------------------------------ folders


@dataclasses.dataclass
class FolderPart:
  split_dir: str
  entries: Sequence[tuple[str, int | None]]  # (relative path, class code).
  numbers: Sequence[int]
  follow_symlinks: bool = False
  # Usage-named test/ (Kaggle's FER2013): the file-name prefix the split
  # reads; an image with no Usage prefix is an `unknown_split` skip.
  usage_prefix: str | None = None

  def __iter__(self) -> Iterator[Item]:
    for (rel, code), number in zip(self.entries, self.numbers):
      number = int(number)
      if not is_image_name(rel):
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
        full = resolve(self.split_dir, rel,
                       follow_symlinks=self.follow_symlinks)
      except PathRefused as e:
        yield Skip(e.reason, number, rel, str(e))
        continue
      yield Row(number, rel, full, code, affect_data.NO_VALUE,
                affect_data.NO_VALUE, None, None)


@dataclasses.dataclass
class FolderIndex:
  split_dir: str
  entries: list[tuple[str, int | None]]
  class_folders: dict[str, int]  # Folder name -> expression code.
  numbers: np.ndarray  # 1-based position in the file listing.
  follow_symlinks: bool = False
  source: str = ""  # The folder the split is read from, e.g. 'test/'.
  usage_prefix: str | None = None  # See FolderPart.

  def __len__(self) -> int:
    return len(self.entries)

  def part(self, start: int, stop: int) -> FolderPart:
    return FolderPart(self.split_dir, self.entries[start:stop],
                      self.numbers[start:stop].tolist(), self.follow_symlinks,
                      self.usage_prefix)

  def subset(self, positions: np.ndarray) -> "FolderIndex":
    return dataclasses.replace(
        self, entries=[self.entries[i] for i in positions],
        numbers=self.numbers[positions])

  def expression_codes(self) -> np.ndarray:
    return np.asarray([-1 if c is None else c for _, c in self.entries],
                      np.int64)

  def inputs(self) -> list[str]:
    return [self.split_dir]


def _files_below(top: str) -> Iterator[str]:
  """Files below `top` in sorted order, through symlinked folders too.

  Symlinked folders are listed (never opened as images here) so that their
  files are counted: `resolve` then refuses or follows each one. Each real
  folder is listed once, which also stops symlink cycles.
  """
  seen = set()
  for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames.sort()
    for f in sorted(filenames):
      yield os.path.join(dirpath, f)


# --folder_numbers: whose label order numeric class folders follow.
FOLDER_NUMBERS = ("auto", "affectnet", "fer2013", "rafdb")


def _numbered_class(name: str, folder_numbers: str) -> int | None:
  """A numeric class folder's code under `folder_numbers` (None: unknown)."""
  from data_prep import public_sets  # pylint: disable=g-import-not-at-top
  key = name.strip()
  if folder_numbers == "fer2013":
    return public_sets.FER2013_MAPPING.get(key)
  if folder_numbers == "rafdb":
    return public_sets.RAFDB_MAPPING.get(key)
  return int(key)


def check_folder_numbers(indexes: dict) -> None:
  """Refuses numeric class folders that look like RAF-DB's numbering.

  Folders named 1-7 with no 0 are how RAF-DB redistributions number its
  classes (1 surprise ... 7 neutral); read as AffectNet codes they would turn
  Neutral into Contempt, silently. `--folder_numbers` says which it is.
  """
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
  if _find(input_dir, _FOLDER_SPLIT["val"]) is not None:
    return None
  test = _find(input_dir, _FOLDER_TEST)
  return test if test is not None and os.path.isdir(test) else None


def folder_usage(input_dir: str) -> bool:
  """Whether test/ (with no val/) names its files for their FER2013 Usage.

  Kaggle's FER2013 image tree does (`PublicTest_123.jpg`,
  `PrivateTest_456.jpg`): one such image name is enough, and the split then
  follows the names; the images without one are counted skips.
  """
  test = _folder_test_dir(input_dir)
  return test is not None and any(
      os.path.basename(p).startswith(tuple(FOLDER_USAGE)) and is_image_name(p)
      for p in _files_below(test))


def _usage_split(rel: str) -> str:
  """The split of a file in a Usage-named test/: an image named for a Usage
  goes to that Usage's split; anything else to val (skipped there)."""
  name = os.path.basename(rel)
  return next((s for p, s in FOLDER_USAGE.items()
               if name.startswith(p) and is_image_name(name)), "val")


def _index_folders(input_dir: str, split: str, follow_symlinks: bool = False,
                   folder_numbers: str = "auto") -> FolderIndex | None:
  usage_prefix = None
  if split in (HOLDOUT, "val") and folder_usage(input_dir):
    # Kaggle's FER2013 tree: test/'s file names pick holdout and val.
    split_dir = _folder_test_dir(input_dir)
    usage_prefix = next(p for p, s in FOLDER_USAGE.items() if s == split)
  elif split == HOLDOUT:
    return None  # Only a Usage-named test/ holds one.
  else:
    split_dir = _find(input_dir, _FOLDER_SPLIT[split])
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
      code = _numbered_class(top.name, folder_numbers)
    if code is None:
      raise LayoutError(
          f"Unknown class folder {top.path}: name class folders 0-7 or one of "
          f"{', '.join(affect_data.LABEL_NAMES_8)} (any case); numbers follow "
          f"--folder_numbers={folder_numbers} (fer2013: 0-6, rafdb: 1-7).")
    class_folders[top.name] = code
    # Files anywhere below a class folder belong to it; sorted for a stable
    # order independent of the file system.
    for path in _files_below(top.path):
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
  return FolderIndex(split_dir, entries, class_folders, numbers,
                     follow_symlinks, source, usage_prefix)


_INDEXERS = {"official": _index_official, "npy": _index_npy,
             "folders": _index_folders}


def index_split(layout: str, input_dir: str, split: str, *,
                follow_symlinks: bool = False, folder_numbers: str = "auto"):
  """The split's row index, or None if the tree has no such split.

  An index has `len()`, `.part(start, stop)` (a picklable block of rows to
  iterate), `.subset(positions)`, `.expression_codes()` and `.inputs()` (the
  files and folders it reads); some have `.source` (where the split comes
  from when that is not obvious, e.g. `test/` or a CSV's Usage value).
  """
  from data_prep import public_sets  # pylint: disable=g-import-not-at-top
  indexers = {**_INDEXERS, **public_sets.INDEXERS}
  if layout not in indexers:
    raise LayoutError(f"--layout must be one of auto, {', '.join(LAYOUTS)}; "
                      f"got {layout!r}.")
  if layout == "folders":
    if folder_numbers not in FOLDER_NUMBERS:
      raise LayoutError(f"--folder_numbers must be one of "
                        f"{', '.join(FOLDER_NUMBERS)}; got {folder_numbers!r}.")
    return _index_folders(input_dir, split, follow_symlinks, folder_numbers)
  return indexers[layout](input_dir, split, follow_symlinks)


def source_splits(layout: str, input_dir: str | None = None
                  ) -> tuple[str, ...]:
  """The splits `layout`'s files can define (FER2013's include `holdout`;
  so does a class tree whose test/ files carry FER2013's Usage names)."""
  from data_prep import public_sets  # pylint: disable=g-import-not-at-top
  if layout == "folders" and input_dir is not None and folder_usage(
      input_dir):
    return SOURCE_SPLITS + (HOLDOUT,)
  return public_sets.SPLITS.get(layout, SOURCE_SPLITS)


def natural_classes(layout: str, indexes: dict) -> int:
  """The class count a dataset has: 7 for FER2013, RAF-DB and class trees
  without a Contempt folder; 8 for AffectNet and FERPlus."""
  from data_prep import public_sets  # pylint: disable=g-import-not-at-top
  if layout in public_sets.NUM_CLASSES:
    return public_sets.NUM_CLASSES[layout]
  if layout == "folders" and not any(
      7 in idx.class_folders.values() for idx in indexes.values()):
    return 7
  return 8


def split_holdout(index, fraction: float, seed: int):
  """Carves a class-stratified `holdout` out of a train index.

  For each expression code c in 0-7, round(fraction * n_c) of its n_c rows
  (at most n_c - 1, so train keeps every class it has) are drawn with
  `np.random.default_rng([seed, c])`. Rows with another or an unreadable
  code stay in train (where they are skipped and counted as usual). The
  choice depends only on (seed, fraction, the rows and their codes): not on
  the worker count, the shard count or earlier runs.

  Returns:
    (train_index, holdout_index), both in source order, disjoint, together
    every row of `index`.
  """
  codes = index.expression_codes()
  chosen = []
  for c in range(len(affect_data.LABEL_NAMES_8)):
    rows = np.flatnonzero(codes == c)
    n = len(rows)
    k = min(int(math.floor(fraction * n + 0.5)), max(n - 1, 0))
    if k:
      rng = np.random.default_rng([seed, c])
      chosen.append(rows[rng.permutation(n)[:k]])
  held = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
  keep = np.setdiff1d(np.arange(len(index)), held, assume_unique=True)
  return index.subset(keep), index.subset(held)


def unused_inputs(input_dir: str, indexes: dict, ignore: Sequence[str] = ()
                  ) -> list[str]:
  """Top-level entries of `input_dir` no split reads (`test/`, extra CSVs).

  Folders end with '/'. Hidden names and the paths in `ignore` (e.g. an
  output folder inside the input) are left out.
  """
  root = os.path.abspath(input_dir)
  used = set()
  for idx in indexes.values():
    for p in list(idx.inputs()) + list(ignore):
      rel = os.path.relpath(os.path.abspath(p), root)
      if rel != "." and not rel.startswith(".."):
        used.add(rel.split(os.sep)[0])
  out = []
  for e in sorted(os.scandir(root), key=lambda e: e.name):
    if e.name not in used and not e.name.startswith("."):
      out.append(e.name + ("/" if e.is_dir() else ""))
  return out
