"""Every layout data_prep reads, in one table: how it is detected and
indexed, which splits and classes it has, and how its labels are named.

The driver (`prepare`) reads only this table. Layouts live below it
(`layouts` for AffectNet's, `public_sets` for FER2013 and FERPlus, `rafdb`
for RAF-DB), all on top of `rows` and `labels`, and never import each other
or this module:

    prepare -> registry -> layouts, public_sets, rafdb -> rows, labels

Adding a layout is one `Layout` entry here plus its `detect_*` and
`index_*` functions.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import numpy as np

from affectjax import data as affect_data
from data_prep import labels
from data_prep import layouts
from data_prep import public_sets
from data_prep import rafdb
from data_prep import rows


@dataclasses.dataclass(frozen=True)
class Layout:
  """One layout: what `prepare` needs to know about it."""
  name: str
  dataset: str  # The dataset's name, for the manifest.
  detect: Callable[[str], bool]  # Are its files in this folder?
  # (input_dir, split, ReadOptions) -> the split's RowIndex, or None if the
  # tree has no such split.
  index: Callable[..., rows.RowIndex | None]
  # The splits its files can define: a tuple, or a function of input_dir
  # (a class tree's test/ may carry a holdout).
  splits: tuple[str, ...] | Callable[[str], tuple[str, ...]] = (
      rows.SOURCE_SPLITS)
  # Its class count: a number, or a function of the split indexes.
  num_classes: int | Callable[[dict], int] = 8
  # Source label (as the files write it) -> class id; None: the codes are
  # affectjax's own.
  label_mapping: dict[str, int] | None = None
  # Source label -> the dataset's name for it (None for AffectNet's codes).
  source_labels: dict | None = None
  # AffectNet's own layouts: of these, only the first found is reported
  # (an official tree may also hold a class-folder tree, say).
  affectnet: bool = False
  # Checks the split indexes together (ReadOptions too) before anything is
  # written; raises LayoutError for a tree it must not guess about.
  check: Callable[[dict, rows.ReadOptions], None] | None = None


LAYOUTS = {l.name: l for l in (
    Layout("official", "AffectNet", layouts.detect_official,
           layouts.index_official, affectnet=True),
    Layout("npy", "AffectNet", layouts.detect_npy, layouts.index_npy,
           affectnet=True),
    Layout("folders", "class folders", layouts.detect_folders,
           layouts.index_folders, splits=layouts.folder_splits,
           num_classes=layouts.folder_classes, affectnet=True,
           check=layouts.check_folder_numbers),
    Layout("fer2013", "FER2013", public_sets.detect_fer2013,
           public_sets.index_fer2013, splits=public_sets.USAGE_SPLIT_NAMES,
           num_classes=7, label_mapping=labels.FER2013_MAPPING,
           source_labels=dict(enumerate(labels.FER2013_LABELS))),
    Layout("ferplus", "FERPlus", public_sets.detect_ferplus,
           public_sets.index_ferplus, splits=public_sets.USAGE_SPLIT_NAMES,
           label_mapping=labels.FERPLUS_MAPPING,
           source_labels=dict(enumerate(labels.FERPLUS_EMOTIONS))),
    Layout("ferplus_folders", "FERPlus", public_sets.detect_ferplus_folders,
           public_sets.index_ferplus_folders,
           splits=public_sets.USAGE_SPLIT_NAMES,
           label_mapping=labels.FERPLUS_MAPPING,
           source_labels=dict(enumerate(labels.FERPLUS_EMOTIONS))),
    Layout("rafdb", "RAF-DB", rafdb.detect_rafdb,
           rafdb.index_rafdb, num_classes=7,
           label_mapping=labels.RAFDB_MAPPING,
           source_labels=labels.RAFDB_LABELS),
)}
NAMES = tuple(LAYOUTS)
FOLDER_NUMBERS = layouts.FOLDER_NUMBERS


def get(name: str) -> Layout:
  if name not in LAYOUTS:
    raise rows.LayoutError(f"--layout must be one of auto, "
                           f"{', '.join(NAMES)}; got {name!r}.")
  return LAYOUTS[name]


def detect(input_dir: str) -> str:
  """The layout of `input_dir`.

  A folder that holds the files of several layouts (a public set's marker
  file beside another layout's files) is ambiguous: the error asks for
  --layout rather than guessing.
  """
  if not os.path.isdir(input_dir):
    raise rows.LayoutError(f"--input_dir={input_dir} is not a directory.")
  found = [l.name for l in LAYOUTS.values()
           if not l.affectnet and l.detect(input_dir)]
  found += [l.name for l in LAYOUTS.values()
            if l.affectnet and l.detect(input_dir)][:1]
  if len(found) > 1:
    raise rows.LayoutError(
        f"{input_dir} holds the files of several layouts ({', '.join(found)}"
        f"); pass --layout={found[0]} (or one of the others) to choose.")
  if found:
    return found[0]
  raise rows.LayoutError(
      f"Cannot detect the layout of {input_dir}: expected "
      "training.csv/validation.csv + Manually_Annotated_Images/ (official), "
      "train_set/images + train_set/annotations (npy), train/<class>/ "
      "(folders), fer2013.csv (fer2013), fer2013new.csv + fer2013.csv "
      "(ferplus), FER2013Train/label.csv (ferplus_folders) or "
      "EmoLabel/list_patition_label.txt (rafdb). Pass --layout to force one.")


def index_split(layout: str, input_dir: str, split: str, *,
                follow_symlinks: bool = False, folder_numbers: str = "auto"):
  """The split's row index (a `rows.RowIndex`), or None if the tree has no
  such split."""
  return get(layout).index(input_dir, split, rows.ReadOptions(
      follow_symlinks=follow_symlinks, folder_numbers=folder_numbers))


def check(layout: str, indexes: dict, *, follow_symlinks: bool = False,
          folder_numbers: str = "auto") -> None:
  """Runs the layout's check over its split indexes (if it has one)."""
  spec = get(layout)
  if spec.check is not None:
    spec.check(indexes, rows.ReadOptions(follow_symlinks=follow_symlinks,
                                         folder_numbers=folder_numbers))


def source_splits(layout: str, input_dir: str) -> tuple[str, ...]:
  """The splits `layout`'s files in `input_dir` define (FER2013's include
  `holdout`)."""
  splits = get(layout).splits
  return splits(input_dir) if callable(splits) else splits


def natural_classes(layout: str, indexes: dict) -> int:
  """The class count a dataset has: 7 for FER2013, RAF-DB and class trees
  without a Contempt folder; 8 for AffectNet and FERPlus."""
  n = get(layout).num_classes
  return n(indexes) if callable(n) else n


def split_holdout(index: rows.RowIndex, fraction: float, seed: int):
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
    found = np.flatnonzero(codes == c)
    n = len(found)
    k = min(int(math.floor(fraction * n + 0.5)), max(n - 1, 0))
    if k:
      rng = np.random.default_rng([seed, c])
      chosen.append(found[rng.permutation(n)[:k]])
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
