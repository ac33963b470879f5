r"""Predict expression and valence/arousal for face images with a trained run.

  python -m affectjax.predict --workdir=runs/demo INPUT... [--output=preds.csv]
      [--checkpoint=best|latest|STEP] [--batch_size=64] [--tta=none|flip]
      [--image_root=DIR]

INPUT is any mix of image files, directories (searched recursively for
images) and AffectNet-style CSV files with face boxes (columns
``subDirectory_filePath, face_x, face_y, face_width, face_height``; image
paths relative to ``--image_root``, default the CSV's folder).

Images are taken as face crops as they are; a CSV row's box is cropped with
the same margin and the same resize as ``data_prep`` (``data_prep.images``:
``crop_box``, ``resize``, ``load_rgb``), to the prepared size the model was
trained on, and the device then resizes to ``config.image_size`` exactly as
in training. Whole photos: ``--detect_faces`` finds faces with OpenCV's
frontal-face Haar cascade, whose model ships inside the OpenCV 4 wheels
(``opencv-python-headless>=4.8,<5``: OpenCV 5 no longer ships the cascades;
no download at run time; ``pip install 'affectjax[detect]'``); each face gets
its own output row. For better boxes, use any detector and the
boxes-CSV route (docs/USING.md).

Output (``.csv``, or JSON lines for ``.jsonl``/``.json``): one row per input
with ``path``, ``face_box``, ``status`` (``ok`` | ``error``), ``error`` (the
reason), ``class``, ``name``, one ``prob_<name>`` per class, ``valence``,
``arousal``. An unreadable image is reported with its reason and never stops
the run.

Python: ``Predictor.from_workdir("runs/demo").predict(["a.jpg", array, ...])``
returns the same rows as dicts.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from affectjax import data
from affectjax import scoring
from affectjax import sharding
from affectjax import workdir as workdir_lib
from data_prep import images as image_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
DEFAULT_MARGIN = 0.1  # data_prep's default --margin.
CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
               "face_height")


@dataclasses.dataclass
class Item:
  """One input: an image file (optionally with a face box) or an array."""
  path: str  # What the output row names it by.
  source: Any = None  # File path (str/epath), bytes, or uint8 (H, W, 3) array.
  box: tuple[float, float, float, float] | None = None  # (x, y, w, h) pixels.
  error: str | None = None  # Known bad before loading (e.g. a broken CSV row).


def _prepared_size(config) -> int:
  """The size data_prep stored faces at (the manifest's), else the model's."""
  p = epath.Path(str(config.data.dir)) / "manifest.json"
  try:
    return int(json.loads(p.read_text())["image_size"])
  except (OSError, ValueError, KeyError, TypeError):
    return int(config.image_size)


class Predictor:
  """Batched prediction with a restored model, on the accelerator.

  Args:
    graphdef, weights: the model (``weights`` = ``{"params", "rest"}``).
    image_size: the model's input size (``config.image_size``).
    input_size: the host-side size faces are resized to (the prepared size).
    num_classes: number of expression logits.
    batch_size: images per device call (rounded up to the device count).
    tta: ``none`` or ``flip``.
    margin: face-box margin for boxed inputs (data_prep's ``--margin``).
    mesh: devices to run on (default: all local devices).
    face_detector: optional callable uint8 (H, W, 3) RGB -> list of face
      boxes (x, y, w, h); when set, file and array inputs without a box are
      treated as whole photos (``opencv_face_detector()``).
  """

  def __init__(self, graphdef, weights: dict, *, image_size: int,
               input_size: int, num_classes: int = 8, batch_size: int = 64,
               tta: str = "none", margin: float = DEFAULT_MARGIN, mesh=None,
               face_detector=None):
    self.mesh = mesh or sharding.make_mesh(jax.local_devices())
    n = self.mesh.devices.size
    self.batch_size = max(n, -(-int(batch_size) // n) * n)
    self.image_size, self.input_size = int(image_size), int(input_size)
    self.names = data.label_names(num_classes)
    self.margin = margin
    self.face_detector = face_detector
    self._weights = jax.device_put(weights, sharding.replicated(self.mesh))
    self._fn = jax.jit(
        lambda w, x: scoring.predict_images(graphdef, w, x,
                                               image_size=self.image_size,
                                               tta=tta),
        out_shardings=sharding.replicated(self.mesh))

  @classmethod
  def from_workdir(cls, workdir, *, checkpoint: str | int = "best",
                   use_ema: bool = True, **kwargs) -> "Predictor":
    """Opens ``workdir`` (see ``affectjax.workdir``) at ``checkpoint``."""
    run = workdir_lib.open_run(workdir, checkpoint=checkpoint)
    kwargs.setdefault("input_size", _prepared_size(run.config))
    return cls(run.graphdef, run.weights(use_ema),
               image_size=run.config.image_size,
               num_classes=run.config.num_classes, mesh=run.mesh, **kwargs)

  # ------------------------------------------------------------------ host
  def load(self, item: Item) -> np.ndarray:
    """One input -> uint8 (input_size, input_size, 3); raises on bad input."""
    if item.error:
      raise ValueError(item.error)
    src = item.source
    if isinstance(src, np.ndarray):
      img = src
      if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
      if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"array input must be uint8 (H, W, 3), got "
                         f"{img.dtype} {img.shape}")
    else:
      raw = src if isinstance(src, bytes) else epath.Path(src).read_bytes()
      img, _, _ = image_lib.load_rgb(raw)
    if item.box is not None:
      x0, y0, x1, y1 = image_lib.crop_box(item.box, self.margin, img.shape[0],
                                          img.shape[1])
      img = img[y0:y1, x0:x1]
    return image_lib.resize(np.ascontiguousarray(img), self.input_size)

  def detect(self, items: Sequence[Item]) -> list[Item]:
    """Whole-photo items -> one item per detected face (or a ``no_face`` error)."""
    out = []
    for item in items:
      if item.error or item.box is not None:
        out.append(item)
        continue
      try:
        src = item.source
        img = src if isinstance(src, np.ndarray) else image_lib.load_rgb(
            src if isinstance(src, bytes) else
            epath.Path(src).read_bytes())[0]
      except Exception:  # pylint: disable=broad-except
        out.append(item)  # load() reports the reason in the output row.
        continue
      boxes = list(self.face_detector(img))
      if not boxes:
        out.append(dataclasses.replace(
            item, error="no_face: the face detector found no face"))
      out += [dataclasses.replace(item, source=img,
                                  box=tuple(float(v) for v in b))
              for b in boxes]
    return out

  def _load_or_error(self, item: Item):
    try:
      return self.load(item), None
    except image_lib.BadImage as e:
      return None, f"{e.reason}: {e}"
    except FileNotFoundError as e:
      return None, f"not_found: {e}"
    except (OSError, ValueError) as e:
      return None, f"{type(e).__name__}: {e}"

  # ---------------------------------------------------------------- device
  def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C), va (N, 2)) of uint8 images (N, S, S, 3), batched."""
    logits, va = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:  # One compiled shape: pad the last batch, drop the pad rows.
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
      x = sharding.shard_batch({"image": chunk}, self.mesh)["image"]
      out_logits, out_va = jax.device_get(self._fn(self._weights, x))
      logits.append(out_logits[:self.batch_size - pad])
      va.append(out_va[:self.batch_size - pad])
    if not logits:
      return (np.zeros((0, len(self.names)), np.float32),
              np.zeros((0, 2), np.float32))
    return np.concatenate(logits), np.concatenate(va)

  def predict(self, inputs: Iterable, *, progress: bool = False,
              num_threads: int = 4) -> list[dict]:
    """Rows (dicts, see the module docstring) for ``inputs``, in order.

    ``inputs``: ``Item``s, file paths, bytes or uint8 (H, W, 3) arrays.
    """
    items = [x if isinstance(x, Item) else Item(
        path=(str(x) if isinstance(x, (str, os.PathLike)) else f"<input {i}>"),
        source=x) for i, x in enumerate(inputs)]
    if self.face_detector is not None:
      items = self.detect(items)
    rows = []
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(items), unit="img", disable=None if progress else True,
               desc="predict")
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for start in range(0, len(items), self.batch_size):
        batch = items[start:start + self.batch_size]
        loaded = list(pool.map(self._load_or_error, batch))
        good = [img for img, err in loaded if err is None]
        if good:
          logits, va = self.predict_arrays(np.stack(good))
          probs = scoring.softmax(logits)
        k = 0
        for item, (_, err) in zip(batch, loaded):
          row = {"path": item.path,
                 "face_box": "" if item.box is None else
                             " ".join(f"{v:g}" for v in item.box)}
          if err is not None:
            row.update(status="error", error=err)
            logging.warning("Could not predict %s: %s", item.path, err)
          else:
            c = int(probs[k].argmax())
            row.update(status="ok", error="", **{"class": c},
                       name=self.names[c],
                       **{f"prob_{n}": float(p)
                          for n, p in zip(self.names, probs[k])},
                       valence=float(va[k, 0]), arousal=float(va[k, 1]))
            k += 1
          rows.append(row)
        bar.update(len(batch))
    bar.close()
    return rows

  def columns(self) -> list[str]:
    return ["path", "face_box", "status", "error", "class", "name",
            *[f"prob_{n}" for n in self.names], "valence", "arousal"]


# --------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------
def _is_image(path: epath.Path) -> bool:
  return path.suffix.lower() in IMAGE_EXTENSIONS


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
      found = sorted(root / name for root, _, files in p.walk()
                     for name in files if _is_image(root / name))
      if not found:
        logging.warning("No images (%s) under %s", ", ".join(IMAGE_EXTENSIONS),
                        p)
      items += [Item(path=str(f), source=f) for f in found]
    elif p.suffix.lower() == ".csv" and p.exists():
      items += csv_items(p, image_root)
    elif p.exists():
      items.append(Item(path=str(p), source=p))
    else:
      items.append(Item(path=str(p), error=f"not_found: {p} does not exist"))
  return items


def opencv_face_detector(min_size: int = 24):
  """OpenCV's frontal-face Haar cascade (the model file ships in the wheel).

  Returns a callable RGB uint8 image -> [(x, y, w, h), ...], largest first.
  """
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "--detect_faces needs OpenCV 4: pip install 'affectjax[detect]' (or "
        "'opencv-python-headless>=4.8,<5'). Or pass a boxes CSV instead "
        "(docs/USING.md)."
        ) from None
  path = os.path.join(cv2.data.haarcascades,
                      "haarcascade_frontalface_default.xml")
  cascade = cv2.CascadeClassifier(path)
  if cascade.empty():
    raise FileNotFoundError(
        f"OpenCV's cascade file {path} is missing or unreadable (OpenCV 5 "
        "does not ship it): pip install 'opencv-python-headless>=4.8,<5'.")

  def detect(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(min_size, min_size))
    boxes = [tuple(int(v) for v in b) for b in np.asarray(found).reshape(-1, 4)]
    return sorted(boxes, key=lambda b: -b[2] * b[3])
  return detect


def write_rows(rows: list[dict], columns: list[str], output) -> None:
  """CSV, or JSON lines for ``.jsonl``/``.json``; temporary name, then rename."""
  from affectjax import report  # pylint: disable=g-import-not-at-top
  output = epath.Path(output)
  if output.suffix.lower() in (".jsonl", ".json"):
    text = "".join(json.dumps({c: r.get(c) for c in columns}) + "\n"
                   for r in rows)
  else:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n",
                       extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v)
                  for k, v in r.items()})
    text = buf.getvalue()
  report.write_text(output, text)


# --------------------------------------------------------------------------
# Command line (flags defined in `run()`, not at import).
# --------------------------------------------------------------------------
def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best, latest, or a step.")
  flags.DEFINE_string("output", "predictions.csv", "Output file: .csv, or "
                      ".jsonl/.json for JSON lines.")
  flags.DEFINE_integer("batch_size", 64, "Images per device call.")
  flags.DEFINE_enum("tta", "none", scoring.TTA_MODES,
                    "flip: average the image and its mirror.")
  flags.DEFINE_string("image_root", None, "Root of the image paths in a "
                      "boxes CSV (default: the CSV's folder).")
  flags.DEFINE_float("margin", DEFAULT_MARGIN, "Face-box margin for CSV "
                     "inputs; use data_prep's --margin of the training data.")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when present.")
  flags.DEFINE_bool("detect_faces", False, "Treat image inputs as whole "
                    "photos: find faces with OpenCV's Haar cascade (needs "
                    "affectjax[detect]); one row per face.")


def main(argv) -> None:
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("Give at least one INPUT: image files, directories "
                         "or a boxes CSV.")
  f = flags.FLAGS
  items = expand_inputs(inputs, f.image_root)
  detector = opencv_face_detector() if f.detect_faces else None
  predictor = Predictor.from_workdir(f.workdir, checkpoint=f.checkpoint,
                                     use_ema=f.use_ema,
                                     batch_size=f.batch_size, tta=f.tta,
                                     margin=f.margin, face_detector=detector)
  rows = predictor.predict(items, progress=True)
  write_rows(rows, predictor.columns(), f.output)
  bad = sum(r["status"] != "ok" for r in rows)
  print(f"Wrote {len(rows)} predictions to {f.output}"
        + (f" ({bad} could not be read; see their 'error' column)" if bad
           else ""), flush=True)


def run() -> None:
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
