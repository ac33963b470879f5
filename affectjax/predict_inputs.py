"""predict's inputs: files, directories, boxes CSVs and videos -> ``Item``s.

  Item                       one input (a file, bytes or an array; a box)
  expand_inputs(args, root)  command-line INPUTs -> Items, in order
  csv_items(csv, root)       an AffectNet-style boxes CSV -> Items with boxes
  is_video_item(item)        a video file, by name

A path that does not exist, or a CSV row without a usable box, becomes an
Item that carries its error, so it is reported in the output table instead
of stopping the run.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Any, Sequence

from absl import logging
from etils import epath

from affectjax import face_crop
from affectjax import video

CSV_COLUMNS = face_crop.BOX_COLUMNS


@dataclasses.dataclass
class Item:
  """One input: an image file (optionally with a face box) or an array."""
  path: str  # What the output row names it by.
  source: Any = None  # File path (str/epath), bytes, or uint8 (H, W, 3) array.
  box: tuple[float, float, float, float] | None = None  # (x, y, w, h) pixels.
  error: str | None = None  # Known bad before loading (e.g. a broken CSV row).
  score: float | None = None  # The face detector's score, for detected boxes.


def is_video_item(item: Item) -> bool:
  """A video file: by name, when it is a file (not an array or bytes)."""
  return (item.error is None and item.box is None
          and (item.source is None or isinstance(item.source, (str, os.PathLike)))
          and video.is_video(item.path))


def _is_image(path: epath.Path) -> bool:
  return path.suffix.lower() in face_crop.IMAGE_EXTENSIONS


def _images_under(directory: epath.Path) -> list[epath.Path]:
  """Image files under ``directory``, recursively.

  Not ``Path.walk``: on gs:// etils yields its roots without the scheme
  ('bucket/dir', a local relative path), so no file would be found.
  """
  found = []
  for child in directory.iterdir():
    if child.is_dir():
      found += _images_under(child)
    elif _is_image(child):
      found.append(child)
  return found


def csv_items(csv_path, image_root=None) -> list[Item]:
  """Rows of an AffectNet-style CSV -> Items with face boxes.

  A row with a missing or non-numeric box becomes an error Item naming the
  CSV line, so it is reported in the output instead of stopping the run.
  """
  csv_path = epath.Path(csv_path)
  root = epath.Path(image_root) if image_root else csv_path.parent
  reader = csv.DictReader(io.StringIO(csv_path.read_text()))
  missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
  if missing:
    raise ValueError(
        f"{csv_path} lacks the column(s) {missing}; a boxes CSV needs "
        f"{', '.join(CSV_COLUMNS)} (AffectNet's training.csv layout).")
  items = []
  for line, row in enumerate(reader, start=2):
    rel = (row.get("subDirectory_filePath") or "").strip()
    item = Item(path=str(root / rel) if rel else f"{csv_path}:{line}",
                source=root / rel)
    try:
      item.box = tuple(float(row[c]) for c in CSV_COLUMNS[1:])
      if item.box[2] <= 0 or item.box[3] <= 0 or not rel:
        raise ValueError
    except (TypeError, ValueError):
      item.box = None
      item.error = (f"bad_row: {csv_path} line {line} needs a path and a face "
                    "box (face_x, face_y, face_width > 0, face_height > 0)")
    items.append(item)
  return items


def expand_inputs(inputs: Sequence[str], image_root=None) -> list[Item]:
  """Files, directories (recursive, sorted) and boxes CSVs -> Items.

  A path that does not exist becomes an error Item (reported, not fatal).
  """
  items = []
  for arg in inputs:
    p = epath.Path(arg).expanduser()
    if p.is_dir():
      found = sorted(_images_under(p))
      if not found:
        logging.warning("No images (%s) under %s (videos are taken when "
                        "named one by one, not from directories)",
                        ", ".join(face_crop.IMAGE_EXTENSIONS), p)
      items += [Item(path=str(f), source=f) for f in found]
    elif p.suffix.lower() == ".csv" and p.exists():
      items += csv_items(p, image_root)
    elif p.exists():
      items.append(Item(path=str(p), source=p))
    else:
      items.append(Item(path=str(p), error=f"not_found: {p} does not exist"))
  return items
