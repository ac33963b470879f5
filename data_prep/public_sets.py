"""FER2013 and FERPlus (its relabelling), as data_prep reads them.

fer2013   `fer2013.csv` (Kaggle's "Challenges in Representation Learning"
          release): columns `emotion,pixels,Usage`; `pixels` is a 48x48
          grayscale face as 2304 space-separated numbers. `Usage` picks the
          split: Training -> train, PublicTest -> holdout (the standard
          model-selection set), PrivateTest -> val (the standard test set).
          Labels 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise,
          6 neutral; 7 classes.
ferplus   Microsoft's `fer2013new.csv` beside the same `fer2013.csv`:
          columns `Usage,Image name,neutral,happiness,surprise,sadness,anger,
          disgust,fear,contempt,unknown,NF` (10 annotator votes per face).
          Row i pairs with row i of fer2013.csv (its pixels). The label is the
          majority vote (FERPlus paper): rows whose top vote is not-a-face
          (`NF`), `unknown`, or a tie are skipped, each under its own reason;
          rows with an empty `Image name` are the faces FERPlus removed.
          Same 8 classes as AffectNet, Contempt included.
ferplus_folders
          FERPlus as its own generate_training_data.py writes it (and as it
          is redistributed): `FER2013Train/`, `FER2013Valid/`,
          `FER2013Test/`, each with its 48 px PNGs and a `label.csv` (no
          header) of rows `fer0000000.png,"(0, 0, 48, 48)",<10 votes>`: the
          image name, the face box as (left, top, right, bottom), then the
          votes in fer2013new.csv's order. Train -> train, Valid -> holdout
          (PublicTest), Test -> val (PrivateTest). The same majority vote as
          `ferplus`; the faces FERPlus removed are not listed.
Each label is mapped to affectjax's class ids (`affectjax.data.LABEL_NAMES_8`
order) by name, so a prepared public set and AffectNet share class ids and
names. These sets have no valence/arousal: written as -2 ("no value").
FER2013 rows carry their pixels, so their `Row.image` holds the face as
(lossless) PGM bytes instead of a file to read.

Each layout has a `detect_*(input_dir) -> bool` and an
`index_*(input_dir, split, options) -> RowIndex | None` (see `rows`); the
indexes set `.source` (where the split comes from, for the manifest and the
summary line). The label orders and their maps are in `labels`.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from affectjax import data as affect_data
from data_prep import labels
from data_prep import rows
from data_prep.rows import HOLDOUT, Item, LayoutError, PathRefused, ReadOptions
from data_prep.rows import Row, Skip

FER2013_CSV = "fer2013.csv"
FERPLUS_CSV = "fer2013new.csv"
# Where the files may sit below --input_dir (the archives' own folders).
_FER_DIRS = ("", "fer2013")

FER2013_COLUMNS = ("emotion", "pixels", "Usage")
FER2013_SIDE = 48
FERPLUS_COLUMNS = ("Usage", "Image name") + labels.FERPLUS_VOTES
# FERPlus's image folders (one per FER2013 Usage) and their label files.
FERPLUS_FOLDERS = {"train": "FER2013Train", HOLDOUT: "FER2013Valid",
                   "val": "FER2013Test"}
FERPLUS_LABEL_FILE = "label.csv"
FERPLUS_LABEL_COLUMNS = ("Image name", "face box") + labels.FERPLUS_VOTES
_FERPLUS_FOLDER_DIRS = ("", "data")
# FER2013/FERPlus `Usage` -> prepared split.
USAGE_SPLITS = {"Training": "train", "PublicTest": HOLDOUT,
                "PrivateTest": "val"}
# The splits FER2013's Usage defines (PublicTest is the native holdout).
USAGE_SPLIT_NAMES = ("train", "val", HOLDOUT)


def detect_fer2013(input_dir: str) -> bool:
  """fer2013.csv without fer2013new.csv (that is FERPlus, which reads it)."""
  return bool(rows.find_file(input_dir, _FER_DIRS, FER2013_CSV)
              and not rows.find_file(input_dir, _FER_DIRS, FERPLUS_CSV))


def detect_ferplus(input_dir: str) -> bool:
  """fer2013new.csv; beside FERPlus's folders only with fer2013.csv too (a
  clone of a repository that ships both holds the CSV as their source)."""
  return bool(rows.find_file(input_dir, _FER_DIRS, FERPLUS_CSV) and (
      not detect_ferplus_folders(input_dir)
      or rows.find_file(input_dir, _FER_DIRS, FER2013_CSV)))


def detect_ferplus_folders(input_dir: str) -> bool:
  return _ferplus_folders_root(input_dir) is not None


def pgm(pixels: np.ndarray) -> bytes:
  """uint8 (H, W) grayscale -> binary PGM bytes (lossless; Pillow reads it)."""
  h, w = pixels.shape
  return f"P5\n{w} {h}\n255\n".encode() + np.ascontiguousarray(
      pixels, np.uint8).tobytes()


_UNREADABLE = (UnicodeDecodeError, csv.Error, ValueError)


def _fer_pixels(text: str) -> np.ndarray:
  values = text.split()
  if len(values) != FER2013_SIDE * FER2013_SIDE:
    raise ValueError(f"{len(values)} pixel values, expected "
                     f"{FER2013_SIDE * FER2013_SIDE} (48x48)")
  a = np.asarray([int(v) for v in values], np.int64)
  if a.min() < 0 or a.max() > 255:
    raise ValueError("pixel values outside 0..255")
  return a.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE)


def _fer_row(fields: list[str], number: int, csv_path: str, path: str,
             ) -> tuple[np.ndarray | None, Skip | None]:
  """The pixels of a fer2013.csv row, or the Skip that replaces it."""
  if len(fields) != len(FER2013_COLUMNS):
    return None, Skip(
        labels.MALFORMED_ROW, number, path,
        f"{os.path.basename(csv_path)}: expected {len(FER2013_COLUMNS)} "
        f"fields ({','.join(FER2013_COLUMNS)}), got {len(fields)}")
  try:
    return _fer_pixels(fields[1]), None
  except ValueError as e:
    return None, Skip(labels.MALFORMED_ROW, number, path,
                      f"{os.path.basename(csv_path)}: {e}")


def _split_of_usage(usage: list[str], split: str) -> tuple[np.ndarray,
                                                           np.ndarray]:
  """Positions of the rows whose Usage maps to `split`, and which are known.

  Rows with an unknown Usage go to train, where each is a counted skip
  (`unknown_split`) instead of silently belonging to no split.
  """
  known = np.asarray([u in USAGE_SPLITS for u in usage], bool)
  mine = np.asarray([USAGE_SPLITS.get(u) == split for u in usage], bool)
  if split == "train":
    mine |= ~known
  return np.flatnonzero(mine), known


def _usage_source(split: str) -> str:
  return next(u for u, s in USAGE_SPLITS.items() if s == split)


# ---------------------------------------------------------------- fer2013


@dataclasses.dataclass
class Fer2013Rows(rows.RowIndex):
  """Lines of fer2013.csv (each holds its face's pixels)."""
  csv_path: str
  source: str
  starts: np.ndarray = rows.per_row()
  ends: np.ndarray = rows.per_row()
  numbers: np.ndarray = rows.per_row()
  usage_ok: np.ndarray = rows.per_row()  # The Usage names a known split.

  def __iter__(self) -> Iterator[Item]:
    name = os.path.basename(self.csv_path)
    for raw, n, ok in zip(rows.read_lines(self.csv_path, self.starts,
                                          self.ends),
                          self.numbers, self.usage_ok):
      n = int(n)
      path = f"{name}:{n}"
      try:
        fields = rows.csv_fields(raw)
      except _UNREADABLE as e:
        yield Skip(labels.MALFORMED_ROW, n, path, f"unreadable: {e}")
        continue
      if not ok:
        yield Skip(labels.UNKNOWN_SPLIT, n, path,
                   f"Usage {fields[-1]!r} is none of {', '.join(USAGE_SPLITS)}")
        continue
      pixels, skip = _fer_row(fields, n, self.csv_path, path)
      if skip is not None:
        yield skip
        continue
      try:
        label = labels.parse_int(fields[0])
      except ValueError as e:
        yield Skip(labels.MALFORMED_ROW, n, path, str(e))
        continue
      if str(label) not in labels.FER2013_MAPPING:
        yield Skip(labels.LABEL_OUT_OF_RANGE, n, path,
                   f"emotion {label} is not a FER2013 label (0-6)")
        continue
      yield Row(n, path, self.csv_path, labels.FER2013_MAPPING[str(label)],
                affect_data.NO_VALUE, affect_data.NO_VALUE, None, None,
                image=pgm(pixels))

  def expression_codes(self) -> np.ndarray:
    codes = np.full(len(self), -1, np.int64)
    for i, raw in enumerate(rows.read_lines(self.csv_path, self.starts,
                                            self.ends)):
      try:
        codes[i] = labels.FER2013_MAPPING.get(
            str(labels.parse_int(raw.split(b",", 1)[0].decode())), -1)
      except (ValueError, UnicodeDecodeError):
        pass
    return codes

  def inputs(self) -> list[str]:
    return [self.csv_path]


def index_fer2013(input_dir: str, split: str,
                  options: ReadOptions = ReadOptions()
                  ) -> Fer2013Rows | None:
  del options  # Pixels are inside the CSV: no path to follow.
  csv_path = rows.find_file(input_dir, _FER_DIRS, FER2013_CSV)
  if csv_path is None:
    raise LayoutError(
        f"{input_dir} has no {FER2013_CSV} (looked in "
        f"{[os.path.join(input_dir, d) for d in _FER_DIRS]}).")
  lines = rows.csv_lines(csv_path, FER2013_COLUMNS[0])
  mine, known = _split_of_usage(lines.last, split)
  if not len(mine):
    return None
  return Fer2013Rows(csv_path, f"{FER2013_CSV} Usage={_usage_source(split)}",
                     lines.starts[mine], lines.ends[mine],
                     lines.numbers[mine], known[mine])


# ------------------------------------------------------- FERPlus' votes


def majority_vote(votes: Sequence[int]) -> tuple[int | None, str | None]:
  """FERPlus votes (10 columns) -> (column of the majority label, None) or
  (None, the skip reason): the FERPlus paper's majority-vote rule drops a face
  whose top vote is not-a-face or unknown, and a tie has no majority."""
  top = max(votes)
  if top <= 0:
    return None, labels.MALFORMED_ROW
  winners = [i for i, v in enumerate(votes) if v == top]
  if len(winners) > 1:
    return None, labels.VOTE_TIED
  w = winners[0]
  if labels.FERPLUS_VOTES[w] == "NF":
    return None, labels.VOTE_NOT_A_FACE
  if labels.FERPLUS_VOTES[w] == "unknown":
    return None, labels.VOTE_UNKNOWN
  return w, None


def ferplus_label(votes_text: Sequence[str], number: int, name: str
                  ) -> tuple[int | None, Skip | None]:
  """FERPlus's 10 vote counts (as text) -> (affectjax class id, None), or
  (None, the Skip that replaces the row): the one place both FERPlus layouts
  turn votes into a label (`majority_vote`)."""
  try:
    if len(votes_text) != len(labels.FERPLUS_VOTES):
      raise ValueError(f"{len(votes_text)} vote counts, expected "
                       f"{len(labels.FERPLUS_VOTES)}")
    votes = [labels.parse_int(v) for v in votes_text]
    if min(votes) < 0:
      raise ValueError(f"negative vote count in {list(votes_text)}")
  except ValueError as e:
    return None, Skip(labels.MALFORMED_ROW, number, name, str(e))
  column, reason = majority_vote(votes)
  if reason is not None:
    return None, Skip(reason, number, name, "votes " + ", ".join(
        f"{c}={v}" for c, v in zip(labels.FERPLUS_VOTES, votes) if v))
  return labels.FERPLUS_MAPPING[labels.FERPLUS_EMOTIONS[column]], None


def _vote_codes(path: str, starts, ends, named) -> np.ndarray:
  """Majority-vote class id per indexed FER+ vote row (-1: no label), for
  the stratified holdout and class counts; ``named(fields)`` says whether the
  row names an image (each layout has its own rule)."""
  codes = np.full(len(starts), -1, np.int64)
  for i, raw in enumerate(rows.read_lines(path, starts, ends)):
    try:
      fields = rows.csv_fields(raw)
    except _UNREADABLE:
      continue
    code, _ = ferplus_label(fields[2:], 0, "")
    if code is not None and named(fields):
      codes[i] = code
  return codes


# ---------------------------------------------------------------- ferplus


def _ferplus_item(vote_raw: bytes, pixel_raw: bytes, number: int,
                  pixel_number: int, csv_path: str, fer_path: str) -> Item:
  try:
    fields = rows.csv_fields(vote_raw)
  except _UNREADABLE as e:
    return Skip(labels.MALFORMED_ROW, number, "", f"unreadable: {e}")
  name = fields[1] if len(fields) > 1 else ""
  if len(fields) != len(FERPLUS_COLUMNS):
    return Skip(
        labels.MALFORMED_ROW, number, name,
        f"{FERPLUS_CSV}: expected {len(FERPLUS_COLUMNS)} fields, got "
        f"{len(fields)}")
  if fields[0] not in USAGE_SPLITS:
    return Skip(labels.UNKNOWN_SPLIT, number, name,
                f"Usage {fields[0]!r} is none of {', '.join(USAGE_SPLITS)}")
  if not name:
    return Skip(labels.DROPPED_BY_FERPLUS, number, "",
                f"empty 'Image name': FERPlus removed this face "
                f"({os.path.basename(fer_path)} line {pixel_number})")
  code, skip = ferplus_label(fields[2:], number, name)
  if skip is not None:
    return skip
  try:
    pixel_fields = rows.csv_fields(pixel_raw)
  except _UNREADABLE as e:
    return Skip(labels.MALFORMED_ROW, number, name,
                f"{os.path.basename(fer_path)} line {pixel_number}: "
                f"unreadable: {e}")
  pixels, skip = _fer_row(pixel_fields, number, fer_path, name)
  if skip is not None:
    skip.detail += f" (line {pixel_number})"
    return skip
  if pixel_fields[2] != fields[0]:
    return Skip(
        labels.MALFORMED_ROW, number, name,
        f"Usage {fields[0]!r} but {os.path.basename(fer_path)} line "
        f"{pixel_number} says {pixel_fields[2]!r}: the two files are not "
        "row-aligned (use the original fer2013.csv)")
  return Row(number, name, csv_path, code, affect_data.NO_VALUE,
             affect_data.NO_VALUE, None, None, image=pgm(pixels))


@dataclasses.dataclass
class FerPlusRows(rows.RowIndex):
  """Lines of fer2013new.csv (votes), each with its fer2013.csv line
  (pixels)."""
  csv_path: str
  fer_path: str
  source: str
  starts: np.ndarray = rows.per_row()  # Lines of fer2013new.csv ...
  ends: np.ndarray = rows.per_row()
  numbers: np.ndarray = rows.per_row()
  fer_starts: np.ndarray = rows.per_row()  # ... and of fer2013.csv.
  fer_ends: np.ndarray = rows.per_row()
  fer_numbers: np.ndarray = rows.per_row()

  def __iter__(self) -> Iterator[Item]:
    votes = rows.read_lines(self.csv_path, self.starts, self.ends)
    pixels = rows.read_lines(self.fer_path, self.fer_starts, self.fer_ends)
    for v, p, n, pn in zip(votes, pixels, self.numbers, self.fer_numbers):
      yield _ferplus_item(v, p, int(n), int(pn), self.csv_path,
                          self.fer_path)

  def expression_codes(self) -> np.ndarray:
    return _vote_codes(self.csv_path, self.starts, self.ends,
                       lambda fields: len(fields) > 1 and bool(fields[1]))

  def inputs(self) -> list[str]:
    return [self.csv_path, self.fer_path]


def index_ferplus(input_dir: str, split: str,
                  options: ReadOptions = ReadOptions()
                  ) -> FerPlusRows | None:
  del options  # Pixels come from fer2013.csv: no path to follow.
  csv_path = rows.find_file(input_dir, _FER_DIRS, FERPLUS_CSV)
  if csv_path is None:
    raise LayoutError(f"{input_dir} has no {FERPLUS_CSV}.")
  fer_path = rows.find_file(input_dir, _FER_DIRS, FER2013_CSV)
  if fer_path is None:
    raise LayoutError(
        f"{csv_path} holds FERPlus's votes but not the faces: put Kaggle's "
        f"original {FER2013_CSV} (35887 rows) beside it; FERPlus row i is "
        f"{FER2013_CSV} row i.")
  votes = rows.csv_lines(csv_path, FERPLUS_COLUMNS[0])
  faces = rows.csv_lines(fer_path, FER2013_COLUMNS[0])
  if len(votes.starts) != len(faces.starts):
    raise LayoutError(
        f"{csv_path} has {len(votes.starts)} rows but {fer_path} has "
        f"{len(faces.starts)}: FERPlus pairs its rows with {FER2013_CSV}'s "
        "by position, so both must be the complete published files.")
  mine, _ = _split_of_usage(votes.first, split)
  if not len(mine):
    return None
  return FerPlusRows(csv_path, fer_path,
                     f"{FERPLUS_CSV} Usage={_usage_source(split)}",
                     votes.starts[mine], votes.ends[mine], votes.numbers[mine],
                     faces.starts[mine], faces.ends[mine],
                     faces.numbers[mine])


# -------------------------------------------------------- ferplus_folders


def _ferplus_folders_root(input_dir: str) -> str | None:
  """The folder that holds FER2013Train/ ... with their label.csv, if any."""
  for d in _FERPLUS_FOLDER_DIRS:
    root = os.path.join(input_dir, d)
    if any(os.path.isfile(os.path.join(root, f, FERPLUS_LABEL_FILE))
           for f in FERPLUS_FOLDERS.values()):
      return root
  return None


def _ferplus_box(text: str) -> tuple[float, float, float, float]:
  """'(0, 0, 48, 48)' (left, top, right, bottom) -> (x, y, w, h)."""
  values = [float(v) for v in text.strip().strip("()").split(",")]
  if len(values) != 4:
    raise ValueError(f"face box {text!r} is not (left, top, right, bottom)")
  left, top, right, bottom = values
  return left, top, right - left, bottom - top


def _ferplus_folder_item(raw: bytes, number: int, label_path: str,
                         follow_symlinks: bool) -> Item:
  name = os.path.basename(label_path)
  try:
    fields = rows.csv_fields(raw)
  except _UNREADABLE as e:
    return Skip(labels.MALFORMED_ROW, number, "",
                f"{name}: unreadable line: {e}")
  image = fields[0] if fields else ""
  if len(fields) != len(FERPLUS_LABEL_COLUMNS):
    return Skip(
        labels.MALFORMED_ROW, number, image,
        f"{name}: expected {len(FERPLUS_LABEL_COLUMNS)} fields (image name, "
        f"face box, {len(labels.FERPLUS_VOTES)} votes), got {len(fields)}")
  code, skip = ferplus_label(fields[2:], number, image)
  if skip is not None:
    return skip
  try:
    box = _ferplus_box(fields[1])
  except ValueError as e:
    return Skip(labels.BAD_FACE_BOX, number, image, str(e))
  if not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
    return Skip(labels.BAD_FACE_BOX, number, image, f"face box {fields[1]}")
  try:
    full = rows.resolve(os.path.dirname(label_path), image,
                        follow_symlinks=follow_symlinks)
  except PathRefused as e:
    return Skip(e.reason, number, image, str(e))
  return Row(number, image, full, code, affect_data.NO_VALUE,
             affect_data.NO_VALUE, box, None)


@dataclasses.dataclass
class FerPlusFolderRows(rows.RowIndex):
  """Lines of one FERPlus folder's label.csv (its PNGs sit beside it)."""
  label_path: str
  source: str
  starts: np.ndarray = rows.per_row()
  ends: np.ndarray = rows.per_row()
  numbers: np.ndarray = rows.per_row()
  follow_symlinks: bool = False

  def __iter__(self) -> Iterator[Item]:
    for raw, n in zip(rows.read_lines(self.label_path, self.starts,
                                      self.ends), self.numbers):
      yield _ferplus_folder_item(raw, int(n), self.label_path,
                                 self.follow_symlinks)

  def expression_codes(self) -> np.ndarray:
    return _vote_codes(self.label_path, self.starts, self.ends,
                       lambda fields: len(fields) == len(FERPLUS_LABEL_COLUMNS))

  def inputs(self) -> list[str]:
    return [os.path.dirname(self.label_path)]


def index_ferplus_folders(input_dir: str, split: str,
                          options: ReadOptions = ReadOptions()
                          ) -> FerPlusFolderRows | None:
  root = _ferplus_folders_root(input_dir)
  if root is None:
    raise LayoutError(
        f"{input_dir} has no {'/, '.join(FERPLUS_FOLDERS.values())}/ folder "
        f"with a {FERPLUS_LABEL_FILE}.")
  folder = FERPLUS_FOLDERS[split]
  label_path = os.path.join(root, folder, FERPLUS_LABEL_FILE)
  if not os.path.isfile(label_path):
    if os.path.isdir(os.path.join(root, folder)):
      raise LayoutError(
          f"{os.path.join(root, folder)} has no {FERPLUS_LABEL_FILE}: its "
          "images have no labels. Copy it from the FERPlus release (or "
          "rerun FERPlus's generate_training_data.py).")
    return None
  lines = rows.csv_lines(label_path, None)  # label.csv has no header.
  return FerPlusFolderRows(
      label_path,
      f"{folder}/{FERPLUS_LABEL_FILE} (Usage={_usage_source(split)})",
      lines.starts, lines.ends, lines.numbers, options.follow_symlinks)
