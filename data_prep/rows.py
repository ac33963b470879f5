"""What every layout shares: rows, skips, safe paths and the row index.

Layouts (`layouts` for AffectNet's, `public_sets` for FER2013 and FERPlus,
`rafdb` for RAF-DB) import this module and `labels`, never each other;
`registry` puts them in one table for the driver (`prepare`).

Rows. Iterating a split's rows yields a `Row` to convert or a `Skip` to
count (its reason is a `labels` key). Nothing is dropped silently.

Paths. A path that a CSV row (or a file name) makes leave its root (`..`,
absolute) is never opened (`path_escapes_root`). A symlink placed in the
tree that points outside the root is refused too (`symlink_outside_root`)
unless `follow_symlinks` is set: datasets assembled from symlinks are common,
but following them is the user's explicit choice (`--follow_symlinks`).

The index. Each split is first *indexed* cheaply (CSV line offsets or a
sorted file list; no image is opened), so that shard i is always the same
contiguous block of rows whatever the worker count, which is what makes a
resumed run identical to an uninterrupted one. A layout's index is a
`RowIndex` dataclass: its `per_row` fields hold one entry per row (parallel
arrays), the others the split's context (its files). `part(start, stop)` is
the same dataclass over a block of rows: small, picklable, and iterable.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

from affectjax import face_crop
from data_prep import labels

# Splits a source tree can hold. `holdout` is a dataset's own model-selection
# split (FER2013's PublicTest) or is carved out of `train`
# (`--holdout_fraction`).
SOURCE_SPLITS = ("train", "val")
HOLDOUT = "holdout"
# Shared with predict (one definition, in affectjax).
IMAGE_EXTENSIONS = face_crop.IMAGE_EXTENSIONS


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


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How a layout reads a tree (the flags that change which rows exist)."""
  # Follow symlinks in the tree that point outside it (--follow_symlinks).
  follow_symlinks: bool = False
  # folders layout: whose numbering numeric class folders follow.
  folder_numbers: str = "auto"


class LayoutError(ValueError):
  """The input directory does not look like the requested layout."""


class PathRefused(ValueError):
  """A row's path is not read; `reason` is the skip-reason key."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


# ------------------------------------------------------------------- paths


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


def find(input_dir: str, candidates: Sequence[str],
         exists: Callable[[str], bool] = os.path.exists) -> str | None:
  """The first `input_dir/candidate` for which `exists` holds, or None."""
  for c in candidates:
    p = os.path.join(input_dir, c)
    if exists(p):
      return p
  return None


def find_file(input_dir: str, dirs: Sequence[str], name: str) -> str | None:
  """The file `name` in the first of `dirs` (below `input_dir`) that holds
  it, or None (the public sets' archives unpack into folders of their own)."""
  return find(input_dir, [os.path.join(d, name) for d in dirs],
              os.path.isfile)


def files_below(top: str) -> Iterator[str]:
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


# ------------------------------------------------------------ CSV lines


@dataclasses.dataclass
class CsvLines:
  """Where each data line of a CSV file is: byte ranges, 1-based line
  numbers, and each line's first and last field (read cheaply, for a split
  column such as FER2013's `Usage`)."""
  starts: np.ndarray
  ends: np.ndarray
  numbers: np.ndarray
  first: list[str]
  last: list[str]


def csv_lines(path: str, header_first_field: str | None) -> CsvLines:
  """Indexes the data lines of the CSV file at `path` (one pass, no parse).

  Blank lines are not rows, nor is a first line whose first field is
  `header_first_field` (None: the file has no header). A UTF-8 BOM is
  ignored.
  """
  starts, ends, numbers, first, last = [], [], [], [], []
  offset = 0
  header = None if header_first_field is None else header_first_field.encode()
  with open(path, "rb") as fp:
    for number, line in enumerate(fp, start=1):
      stripped = line.strip()
      head = stripped.lstrip(b"\xef\xbb\xbf").split(b",", 1)[0].strip()
      if stripped and not (number == 1 and head == header):
        starts.append(offset)
        ends.append(offset + len(line))
        numbers.append(number)
        first.append(head.decode("utf-8", "replace"))
        last.append(stripped.rsplit(b",", 1)[-1].strip().decode(
            "utf-8", "replace"))
      offset += len(line)
  return CsvLines(np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                  np.asarray(numbers, np.int64), first, last)


def read_lines(path: str, starts: np.ndarray, ends: np.ndarray
               ) -> list[bytes]:
  """The lines at [starts, ends) of `path` (increasing), in one read (lines
  in between, e.g. another split's, are read and ignored)."""
  if not len(starts):
    return []
  with open(path, "rb") as fp:
    fp.seek(int(starts[0]))
    block = fp.read(int(ends[-1] - starts[0]))
  base = int(starts[0])
  return [block[s - base:e - base] for s, e in zip(starts, ends)]


def csv_fields(raw: bytes) -> list[str]:
  """One CSV line's fields, quotes honoured, each stripped. Raises
  UnicodeDecodeError, csv.Error or ValueError for an unreadable line."""
  line = raw.decode("utf-8").strip("\r\n\ufeff")
  (fields,) = list(csv.reader([line]))
  return [f.strip() for f in fields]


# --------------------------------------------------------------- the index


def per_row(**kwargs) -> Any:
  """A `RowIndex` field that holds one entry per row (an array or list)."""
  return dataclasses.field(metadata={"per_row": True}, **kwargs)


def _take(values, which):
  if isinstance(values, np.ndarray):
    return values[which]
  if isinstance(which, slice):
    return values[which]
  return [values[i] for i in which]


class RowIndex:
  """Base of every layout's split index (a dataclass; see the module doc).

  A subclass declares its per-row fields with `per_row()` and defines
  `__iter__` (its rows, as `Row`s and `Skip`s), `expression_codes()` (each
  row's class id or -1, for the stratified holdout) and `inputs()` (the
  files and folders it reads). It may set `source`: where the split comes
  from when its name does not say (`test/`, a CSV's Usage value).
  """

  def _per_row_names(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self)
            if f.metadata.get("per_row")]

  def __len__(self) -> int:
    return len(getattr(self, self._per_row_names()[0]))

  def subset(self, positions: np.ndarray | slice):
    """The rows at `positions` (increasing), keeping their numbers."""
    return dataclasses.replace(self, **{
        n: _take(getattr(self, n), positions) for n in self._per_row_names()})

  def part(self, start: int, stop: int):
    """Rows [start, stop): the block one shard converts."""
    return self.subset(slice(start, stop))

  def __iter__(self) -> Iterator[Item]:
    raise NotImplementedError

  def expression_codes(self) -> np.ndarray:
    raise NotImplementedError

  def inputs(self) -> list[str]:
    raise NotImplementedError
