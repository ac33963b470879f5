"""RAF-DB (the Real-world Affective Faces Database, "basic" set), as data_prep
reads it.

rafdb     RAF-DB "basic": `EmoLabel/list_patition_label.txt` (lines such as
          `train_00001.jpg 5`; the misspelling is the published name), images
          in `Image/aligned/` (`train_00001_aligned.jpg`, preferred) or
          `Image/original/`. Labels 1 surprise, 2 fear, 3 disgust, 4 happy,
          5 sad, 6 anger, 7 neutral; `train_*` rows -> train, `test_*` -> val;
          7 classes.

Each label is mapped to affectjax's class ids by name (`labels.RAFDB_MAPPING`),
as the other public sets' are (`public_sets`); RAF-DB has no
valence/arousal: written as -2 ("no value"). `detect_rafdb(input_dir)` and
`index_rafdb(input_dir, split, options) -> RowIndex | None` (see `rows`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from affectjax import data as affect_data
from data_prep import labels
from data_prep import rows
from data_prep.rows import Item, LayoutError, PathRefused, ReadOptions
from data_prep.rows import Row, Skip

RAFDB_LIST = os.path.join("EmoLabel", "list_patition_label.txt")
# Where the files may sit below --input_dir (the archive's own folders).
_RAFDB_DIRS = ("", "basic")
_RAFDB_IMAGE_DIRS = (("aligned", os.path.join("Image", "aligned")),
                     ("original", os.path.join("Image", "original")))
_RAFDB_PREFIX = {"train": "train_", "val": "test_"}


def detect_rafdb(input_dir: str) -> bool:
  return rows.find_file(input_dir, _RAFDB_DIRS, RAFDB_LIST) is not None


@dataclasses.dataclass
class RafdbRows(rows.RowIndex):
  """Lines of RAF-DB's label list, each naming an image and its label."""
  list_path: str
  image_root: str
  aligned: bool
  source: str
  entries: list[tuple[str, str]] = rows.per_row()  # (image name, label text)
  numbers: np.ndarray = rows.per_row()
  follow_symlinks: bool = False

  def __iter__(self) -> Iterator[Item]:
    for (name, text), n in zip(self.entries, self.numbers):
      n = int(n)
      if not name.startswith(tuple(_RAFDB_PREFIX.values())):
        yield Skip(labels.UNKNOWN_SPLIT, n, name,
                   "the name starts with neither train_ nor test_")
        continue
      try:
        label = labels.parse_int(text)
      except ValueError:
        yield Skip(labels.MALFORMED_ROW, n, name,
                   f"line is not '<image> <label>': {name} {text}")
        continue
      if str(label) not in labels.RAFDB_MAPPING:
        yield Skip(labels.LABEL_OUT_OF_RANGE, n, name,
                   f"label {label} is not a RAF-DB basic label (1-7)")
        continue
      rel = name
      if self.aligned:  # train_00001.jpg -> train_00001_aligned.jpg
        stem, ext = os.path.splitext(name)
        rel = f"{stem}_aligned{ext}"
        if (rows.find_case_variant(os.path.join(self.image_root, rel))
            is None and rows.find_case_variant(
                os.path.join(self.image_root, name)) is not None):
          rel = name  # A redistribution that dropped the suffix.
      try:
        full = rows.resolve(self.image_root, rel,
                            follow_symlinks=self.follow_symlinks)
      except PathRefused as e:
        yield Skip(e.reason, n, rel, str(e))
        continue
      yield Row(n, rel, full, labels.RAFDB_MAPPING[str(label)],
                affect_data.NO_VALUE, affect_data.NO_VALUE, None, None)

  def expression_codes(self) -> np.ndarray:
    return np.asarray([labels.RAFDB_MAPPING.get(t.strip(), -1)
                       for _, t in self.entries], np.int64)

  def inputs(self) -> list[str]:
    return [self.list_path, self.image_root]


def index_rafdb(input_dir: str, split: str,
                options: ReadOptions = ReadOptions()) -> RafdbRows | None:
  list_path = rows.find_file(input_dir, _RAFDB_DIRS, RAFDB_LIST)
  if list_path is None:
    raise LayoutError(f"{input_dir} has no {RAFDB_LIST}.")
  root = os.path.dirname(os.path.dirname(list_path))
  image_root = kind = None
  for k, d in _RAFDB_IMAGE_DIRS:
    if os.path.isdir(os.path.join(root, d)):
      image_root, kind = os.path.join(root, d), k
      break
  if image_root is None:
    raise LayoutError(
        f"{list_path} lists RAF-DB's images but {root} has neither "
        f"{_RAFDB_IMAGE_DIRS[0][1]}/ nor {_RAFDB_IMAGE_DIRS[1][1]}/.")
  entries, numbers = [], []
  prefix = _RAFDB_PREFIX[split]
  with open(list_path, encoding="utf-8-sig") as fp:
    for number, line in enumerate(fp, start=1):
      parts = line.split()
      if not parts:
        continue
      name = parts[0]
      # A line naming neither split goes to train, as a counted skip.
      other = not name.startswith(tuple(_RAFDB_PREFIX.values()))
      if name.startswith(prefix) or (split == "train" and other):
        entries.append((name, " ".join(parts[1:])))
        numbers.append(number)
  if not entries:
    return None
  return RafdbRows(list_path, image_root, kind == "aligned",
                   f"{RAFDB_LIST} {prefix}* rows, Image/{kind}/", entries,
                   np.asarray(numbers, np.int64), options.follow_symlinks)
