r"""Synthetic AffectNet: procedurally drawn faces in AffectNet's official layout.

    python -m data_prep.synthetic --output_dir=/tmp/affectnet_synth \
        --num_train=4000 --num_val=800 --seed=0 [--class_balance=floored]

(absl flags: `--help` lists them)

writes

    Manually_Annotated_Images/<subdir>/<sha1>.jpg
    training.csv, validation.csv   (the official 9 columns, with header)

so every tool that reads real AffectNet reads it unchanged. It is the default
dataset wherever a user has no AffectNet (which is licensed; see docs/DATA.md).

How each face is drawn, and why it is not trivial to classify, is
`data_prep.synthetic_face`'s.

Labels. Valence/arousal are drawn from AffectNet-like class-conditional
Gaussians (`synthetic_face.VA_MEAN_STD`, scaled by intensity) and clipped to
[-1, 1]. The train split follows AffectNet's class imbalance
(`AFFECTNET_TRAIN_COUNTS`), in one of two `class_balance` modes:
  * 'floored' (default): every class gets at least `MIN_CLASS_FRACTION` (5%)
    of the rows, because at demo sizes (a few thousand images) AffectNet's
    1.3% Contempt would leave a couple of dozen examples, too few for a small
    CNN to learn in minutes;
  * 'affectnet': AffectNet's own proportions (Happy 47%, Contempt 1.3%), to
    exercise class weighting and balanced sampling as on the real data.
Counts are allocated exactly (largest remainder), then shuffled. The val
split is balanced in both modes, like AffectNet's (500 per class).

Determinism: image i of a split uses `np.random.default_rng([seed, split, i])`,
so the output is identical whatever the worker count.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from typing import Sequence

import numpy as np
from absl import app
from absl import flags
from PIL import Image, ImageDraw

from affectjax import data as affect_data
# Re-exported: callers draw faces and read the label statistics here.
from data_prep.synthetic_face import VA_MEAN_STD  # pylint: disable=W0611
from data_prep.synthetic_face import render_face
from data_prep.synthetic_face import sample_face

# AffectNet's manually annotated train split, codes 0..7.
AFFECTNET_TRAIN_COUNTS = (74874, 134415, 25459, 14090, 6378, 3803, 24882,
                          3750)
MIN_CLASS_FRACTION = 0.05
# Train-split class proportions (see the module doc); val is always balanced.
CLASS_BALANCES = ("floored", "affectnet")
CSV_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,"
              "facial_landmarks,expression,valence,arousal")
IMAGES_DIR = "Manually_Annotated_Images"
_SPLIT_IDS = {"train": 0, "val": 1}
_CSV_NAMES = {"train": "training.csv", "val": "validation.csv"}
_FILES_PER_SUBDIR = 500  # AffectNet spreads images over numbered folders.

def class_counts(n: int, split: str, num_classes: int = 8,
                 class_balance: str = "floored") -> list[int]:
  """Exact per-class counts for a split of n rows (see module docstring)."""
  if class_balance not in CLASS_BALANCES:
    raise ValueError(f"--class_balance must be one of {CLASS_BALANCES}, got "
                     f"{class_balance!r}.")
  if split == "val":
    p = np.full(num_classes, 1.0 / num_classes)
  else:
    p = np.asarray(AFFECTNET_TRAIN_COUNTS[:num_classes], np.float64)
    p /= p.sum()
  if split != "val" and class_balance == "floored":
    # Raise rare classes to the floor and shrink the others proportionally;
    # repeat, since shrinking can push another class under the floor.
    floored = np.zeros(num_classes, bool)
    while True:
      floored |= p < MIN_CLASS_FRACTION
      free = ~floored
      p[floored] = MIN_CLASS_FRACTION
      p[free] *= (1 - MIN_CLASS_FRACTION * floored.sum()) / p[free].sum()
      if (p >= MIN_CLASS_FRACTION - 1e-12).all():
        break
  raw = p * n
  counts = np.floor(raw).astype(int)
  # Largest remainder: hand the leftover rows to the biggest fractions.
  for c in np.argsort(-(raw - counts), kind="stable")[:n - counts.sum()]:
    counts[c] += 1
  return counts.tolist()


def _labels(n: int, split: str, seed: int,
            class_balance: str = "floored") -> np.ndarray:
  counts = class_counts(n, split, class_balance=class_balance)
  labels = np.repeat(np.arange(len(counts)), counts)
  np.random.default_rng([seed, _SPLIT_IDS[split], 999]).shuffle(labels)
  return labels


def _rel_path(split: str, seed: int, i: int) -> str:
  name = hashlib.sha1(f"{seed}-{split}-{i}".encode()).hexdigest()
  return f"{i // _FILES_PER_SUBDIR + 1 + 1000 * _SPLIT_IDS[split]}/{name}.jpg"


def _make_rows(task) -> list[str]:
  """Renders and writes images [start, stop) of a split; returns CSV rows."""
  output_dir, split, seed, start, labels, image_size = task
  rows = []
  for k, expr in enumerate(labels):
    i = start + k
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
    f = sample_face(expr, rng)
    img, lm, (x, y, w, h) = render_face(
        int(expr), f["valence"], f["arousal"], rng, image_size,
        intensity=f["intensity"], other=f["other"], blend=f["blend"])
    v, a = f["valence_label"], f["arousal_label"]
    rel = _rel_path(split, seed, i)
    path = os.path.join(output_dir, IMAGES_DIR, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG",
                              quality=int(rng.integers(30, 96)))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fp:
      fp.write(buf.getvalue())
    os.replace(tmp, path)
    lms = ";".join(f"{c:.2f}" for c in lm.reshape(-1))
    rows.append(f"{rel},{x},{y},{w},{h},{lms},{int(expr)},{v:.6f},{a:.6f}")
  return rows


def generate(output_dir: str, num_train: int, num_val: int, seed: int = 0, *,
             image_size: int = 144, num_workers: int = 1,
             chunk_size: int = 256,
             class_balance: str = "floored") -> dict[str, int]:
  """Writes a synthetic AffectNet tree; returns {'train': n, 'val': m}.

  Args:
    output_dir: destination (created if needed).
    num_train, num_val: rows in training.csv / validation.csv.
    seed: everything is a deterministic function of the seed.
    image_size: side of the raw images (the face box sits inside).
    num_workers: processes drawing images (1 = in-process).
    chunk_size: images per work item.
    class_balance: train-split class proportions, 'floored' (AffectNet's
      with a 5% floor per class) or 'affectnet' (AffectNet's own).
  """
  class_counts(0, "train", class_balance=class_balance)  # Validates it.
  if image_size < 32:
    raise ValueError(f"image_size must be >= 32 px, got {image_size}.")
  os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
  pool = None
  if num_workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(num_workers)
  try:
    for split, n in (("train", num_train), ("val", num_val)):
      labels = _labels(n, split, seed, class_balance)
      tasks = [(output_dir, split, seed, s, labels[s:s + chunk_size].tolist(),
                image_size) for s in range(0, n, chunk_size)]
      results = pool.imap(_make_rows, tasks) if pool else map(_make_rows,
                                                               tasks)
      csv_path = os.path.join(output_dir, _CSV_NAMES[split])
      tmp = f"{csv_path}.tmp{os.getpid()}"
      with open(tmp, "w", newline="") as fp:
        fp.write(CSV_HEADER + "\n")
        for rows in results:  # In order, streamed: memory stays bounded.
          fp.write("\n".join(rows) + "\n")
      os.replace(tmp, csv_path)
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  return {"train": num_train, "val": num_val}


def contact_sheet(output_dir: str, path: str, per_class: int = 6,
                  split: str = "train") -> None:
  """Saves a PNG grid: one row per class, `per_class` face crops each."""
  import csv  # pylint: disable=g-import-not-at-top
  by_class: dict[int, list] = {}
  with open(os.path.join(output_dir, _CSV_NAMES[split])) as fp:
    for row in csv.DictReader(fp):
      c = int(row["expression"])
      if len(by_class.setdefault(c, [])) < per_class:
        by_class[c].append(row)
  tile = 96
  sheet = Image.new("RGB", (tile * per_class, tile * len(by_class)))
  for r, c in enumerate(sorted(by_class)):
    for k, row in enumerate(by_class[c]):
      im = Image.open(os.path.join(output_dir, IMAGES_DIR,
                                   row["subDirectory_filePath"]))
      x, y, w, h = (int(row[f]) for f in ("face_x", "face_y", "face_width",
                                           "face_height"))
      im = im.crop((x, y, x + w, y + h)).resize((tile, tile))
      ImageDraw.Draw(im).text(
          (2, 2), f"{affect_data.LABEL_NAMES_8[c][:4]} "
          f"v{float(row['valence']):+.1f} a{float(row['arousal']):+.1f}",
          fill=(255, 255, 0))
      sheet.paste(im, (k * tile, r * tile))
  sheet.save(path)


def define_flags() -> None:
  """Defines the command-line flags (absl), as the trainer does.

  Called only when the module runs as a program: `data_prep.affectnet`
  shares flag names, and both modules are imported together.
  """
  flags.DEFINE_string("output_dir", None, "Destination directory.")
  flags.DEFINE_integer("num_train", 4000, "Rows in training.csv.",
                       lower_bound=0)
  flags.DEFINE_integer("num_val", 800, "Rows in validation.csv.",
                       lower_bound=0)
  flags.DEFINE_integer("seed", 0, "Everything is a function of the seed.")
  flags.DEFINE_integer("image_size", 144,
                       "Side of the raw images in px (face box inside).",
                       lower_bound=32)
  flags.DEFINE_enum(
      "class_balance", "floored", CLASS_BALANCES,
      "Train-split classes: 'floored' = AffectNet's imbalance with a 5% "
      "floor per class (learnable at demo sizes); 'affectnet' = AffectNet's "
      "own (Happy 47%, Contempt 1.3%). Validation is balanced in both.")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                       "Processes drawing images.", lower_bound=1)
  flags.DEFINE_string("contact_sheet", "",
                      "Optional PNG path: a grid of examples per class.")
  flags.mark_flags_as_required(["output_dir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  generate(f.output_dir, f.num_train, f.num_val, f.seed,
           image_size=f.image_size, num_workers=f.num_workers,
           class_balance=f.class_balance)
  print(f"Wrote {f.num_train} train + {f.num_val} val synthetic faces "
        f"({f.class_balance} class balance) to {f.output_dir}")
  if f.contact_sheet:
    contact_sheet(f.output_dir, f.contact_sheet)
    print(f"Contact sheet: {f.contact_sheet}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
