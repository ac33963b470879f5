r"""Predict expression and valence/arousal for face images and videos with a trained run.

  python -m affectjax.predict --workdir=runs/demo INPUT... [--output=preds.csv]
      [--checkpoint=best|latest|STEP] [--batch_size=64] [--tta=none|flip]
      [--image_root=DIR] [--margin=M (default: the run's)] [--detect_faces]
      [--fps=N] [--smooth=SECONDS] [--annotate]

INPUT is any mix of image files, directories (searched recursively for
images) and AffectNet-style CSV files with face boxes (columns
``subDirectory_filePath, face_x, face_y, face_width, face_height``; image
paths relative to ``--image_root``, default the CSV's folder), and video
files (``.mp4 .mkv .avi .webm .mov``, named one by one).

Everything about the model's input comes from the run itself (its
``run_contract.json``; the data it was trained on is not needed): images are
taken as face crops as they are, a CSV row's box is cropped with the margin
data_prep used for the run's data, both through the code data_prep stores
faces with (``affectjax.face_crop``: the same decode, crop and resize, so the
same photo and box give the same pixels), at the prepared size the model was
trained on; the device then resizes to ``config.image_size`` exactly as in
training. Whole photos: ``--detect_faces`` finds faces with OpenCV's
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

Videos (``affectjax.video``; OpenCV decodes them, the ``detect`` extra):
each sampled frame (``--fps``, default every frame) goes through the face
detector, faces are linked into tracks by IoU, and the crops run through
the same crop and compiled forward as photos, in batches. One row per
(frame, face), with ``frame``, ``time`` and ``track`` columns added to the
table (empty on photo rows); a frame without a face or unreadable gets a row
saying so (``no_face``, ``unreadable_frame``); a video that cannot be
opened gets one ``unreadable_video`` row naming it, and the other inputs
still run. ``--smooth=S`` adds an EMA over time (``*_smooth`` columns)
beside the raw values. Each video's pictures (``track_<id>.png``: the
expression timeline and the valence/arousal trace of one track) and, with
``--annotate``, its annotated copy (``<stem>_annotated.mp4``) go into a
folder beside ``--output`` named after the video (``<stem>``, ``<stem>-2``
for a second video of the same name); the table stays one file for the
whole call, photos and videos in input order.

Python: ``Predictor.from_workdir("runs/demo").predict(["a.jpg", array, ...])``
returns the same rows as dicts; ``.predict_video("clip.mp4")`` a video's.
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

from affectjax import cli
from affectjax import face_crop
from affectjax import fileio
from affectjax import run_contract
from affectjax import scoring
from affectjax import sharding
from affectjax import video
from affectjax import workdir as workdir_lib

CSV_COLUMNS = face_crop.BOX_COLUMNS


@dataclasses.dataclass
class Item:
  """One input: an image file (optionally with a face box) or an array."""
  path: str  # What the output row names it by.
  source: Any = None  # File path (str/epath), bytes, or uint8 (H, W, 3) array.
  box: tuple[float, float, float, float] | None = None  # (x, y, w, h) pixels.
  error: str | None = None  # Known bad before loading (e.g. a broken CSV row).


class Predictor:
  """Batched prediction with a restored model, on the accelerator.

  Args:
    graphdef, weights: the model (``weights`` = ``{"params", "rest"}``).
    contract: the run's ``run_contract.Contract``: the host-side size faces
      are cropped to (``input_size``, the prepared size), the model's size
      (``image_size``), the crop margin and the class names.
    batch_size: images per device call (rounded up to the device count).
    tta: ``none`` or ``flip``.
    margin: face-box margin for boxed inputs; default the contract's (the
      ``--margin`` data_prep prepared the run's data with).
    mesh: devices to run on (default: all local devices).
    face_detector: optional callable uint8 (H, W, 3) RGB -> list of face
      boxes (x, y, w, h); when set, file and array inputs without a box are
      treated as whole photos (``opencv_face_detector()``).
  """

  def __init__(self, graphdef, weights: dict, *,
               contract: run_contract.Contract, batch_size: int = 64,
               tta: str = "none", margin: float | None = None, mesh=None,
               face_detector=None):
    self.mesh = mesh or sharding.make_mesh(jax.local_devices())
    n = self.mesh.devices.size
    self.batch_size = max(n, -(-int(batch_size) // n) * n)
    self.contract = contract
    self.image_size = contract.model_size
    self.input_size = contract.prepared_size
    self.names = contract.class_names
    self.margin = contract.margin if margin is None else float(margin)
    self.face_detector = face_detector
    self._opencv_detector = None
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
    return cls(run.graphdef, run.weights(use_ema), contract=run.contract,
               mesh=run.mesh, **kwargs)

  # ------------------------------------------------------------------ host
  def load(self, item: Item) -> np.ndarray:
    """One input -> uint8 (input_size, input_size, 3); raises on bad input.

    Files and bytes go through data_prep's own crop (``face_crop.crop_face``:
    decoded at the DCT scale the crop needs), arrays through the same crop
    and resize at their given size.
    """
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
      return face_crop.crop_array(img, item.box, self.margin,
                                  self.input_size).image
    raw = src if isinstance(src, bytes) else epath.Path(src).read_bytes()
    return face_crop.crop_face(raw, item.box, self.margin,
                               self.input_size).image

  def detect(self, items: Sequence[Item]) -> list[Item]:
    """Whole-photo items -> one item per detected face (or a ``no_face`` error)."""
    out = []
    for item in items:
      if item.error or item.box is not None:
        out.append(item)
        continue
      try:
        src = item.source
        if not isinstance(src, np.ndarray):
          # Bytes in memory: each face is then cropped from them exactly as
          # data_prep would crop it (load()), not from this full decode.
          src = src if isinstance(src, bytes) else epath.Path(src).read_bytes()
        img = src if isinstance(src, np.ndarray) else face_crop.load_rgb(src)[0]
      except Exception:  # pylint: disable=broad-except
        out.append(item)  # load() reports the reason in the output row.
        continue
      boxes = list(self.face_detector(img))
      if not boxes:
        out.append(dataclasses.replace(
            item, error="no_face: the face detector found no face"))
      out += [dataclasses.replace(item, source=src,
                                  box=tuple(float(v) for v in b))
              for b in boxes]
    return out

  def _load_or_error(self, item: Item):
    try:
      return self.load(item), None
    except face_crop.BadImage as e:
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
              num_threads: int = 4, fps: float | None = None,
              smooth: float | None = None) -> list[dict]:
    """Rows (dicts, see the module docstring) for ``inputs``, in order.

    ``inputs``: ``Item``s, file paths, bytes or uint8 (H, W, 3) arrays. A
    video file (``video.VIDEO_EXTENSIONS``) gives its ``predict_video``
    rows in its place (``fps``, ``smooth`` apply to it), or one error row
    when it cannot be opened; the other inputs still run.
    """
    items = [x if isinstance(x, Item) else Item(
        path=(str(x) if isinstance(x, (str, os.PathLike)) else f"<input {i}>"),
        source=x) for i, x in enumerate(inputs)]
    rows, photos = [], []
    for item in items + [None]:
      if item is not None and not _is_video_item(item):
        photos.append(item)
        continue
      if photos:  # The photos before this video (or the end), in one go.
        rows += self._predict_photos(photos, progress, num_threads)
        photos = []
      if item is not None:
        try:
          rows += self.predict_video(item.path if item.source is None
                                     else item.source, fps=fps, smooth=smooth,
                                     progress=progress, name=item.path)
        except video.VideoError as e:
          logging.warning("Could not predict %s: %s", item.path, e)
          rows.append({"path": item.path, "face_box": "", "status": "error",
                       "error": f"unreadable_video: {e}"})
    return rows

  def _predict_photos(self, items: list[Item], progress: bool,
                      num_threads: int) -> list[dict]:
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
                 "face_box": "" if item.box is None else _box_text(item.box)}
          if err is not None:
            row.update(status="error", error=err)
            logging.warning("Could not predict %s: %s", item.path, err)
          else:
            self._fill(row, probs[k], va[k])
            k += 1
          rows.append(row)
        bar.update(len(batch))
    bar.close()
    return rows

  def _fill(self, row: dict, probs: np.ndarray, va: np.ndarray) -> dict:
    """The model's outputs for one face, into its row."""
    c = int(probs.argmax())
    row.update(status="ok", error="", **{"class": c}, name=self.names[c],
               **{f"prob_{n}": float(p) for n, p in zip(self.names, probs)},
               valence=float(va[0]), arousal=float(va[1]))
    return row

  # ---------------------------------------------------------------- videos
  def video_detector(self):
    """The detector videos use: ``face_detector``, else OpenCV's cascade
    (made once; photos still use ``face_detector`` only)."""
    if self.face_detector is not None:
      return self.face_detector
    if self._opencv_detector is None:
      self._opencv_detector = opencv_face_detector()
    return self._opencv_detector

  def predict_video(self, path, *, fps: float | None = None,
                    smooth: float | None = None, progress: bool = False,
                    name: str | None = None) -> list[dict]:
    """Rows of one video: one per (sampled frame, face), in frame order.

    Each sampled frame (``fps``: see ``affectjax.video``) goes through the
    face detector (``video_detector()``); its faces are linked to tracks
    (``video.IouTracker``), cropped exactly as a photo with that box would
    be (``load``) and run through the compiled model ``batch_size`` crops at
    a time. Row keys: the photo rows' plus ``frame`` (index), ``time``
    (seconds) and ``track`` (id); with ``smooth`` (seconds), also
    ``video.SMOOTH_COLUMNS``. A frame without a face, or unreadable, gets
    one row with ``status=error`` and the reason (``no_face``,
    ``unreadable_frame``). Raises ``video.VideoError`` naming the file when
    it cannot be opened at all.
    """
    name = str(path) if name is None else name
    detector = self.video_detector()
    tracker = video.IouTracker()
    rows, pending = [], []  # pending: (row, crop) waiting for the model.

    def flush():
      if pending:
        logits, va = self.predict_arrays(np.stack([c for _, c in pending]))
        for (row, _), p, v in zip(pending, scoring.softmax(logits), va):
          self._fill(row, p, v)
        pending.clear()

    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    with video.VideoReader(path, fps) as reader:
      bar = tqdm(total=reader.count, unit="frame", desc=os.path.basename(name),
                 disable=None if progress else True)
      for frame in reader:
        bar.update(frame.index + 1 - bar.n)
        base = {"path": name, "frame": frame.index,
                "time": round(frame.time, 6), "track": None, "face_box": ""}
        if frame.image is None:
          rows.append({**base, "status": "error", "error": frame.error})
          continue
        boxes = [tuple(float(v) for v in b) for b in detector(frame.image)]
        if not boxes:
          rows.append({**base, "status": "error", "error":
                       "no_face: the face detector found no face in this frame"})
          continue
        for box, track in zip(boxes, tracker.update(boxes, frame.time)):
          row = {**base, "track": track, "face_box": _box_text(box)}
          crop, err = self._load_or_error(
              Item(path=name, source=frame.image, box=box))
          rows.append(row)
          if err is not None:
            row.update(status="error", error=err)
            continue
          pending.append((row, crop))
          if len(pending) >= self.batch_size:
            flush()
      flush()
      bar.close()
    if not rows:  # Opened, but not one frame came out: say so.
      rows.append({"path": name, "frame": None, "time": None, "track": None,
                   "face_box": "", "status": "error",
                   "error": "no_frames: the video opened but no frame could "
                            "be read from it"})
    if smooth:
      video.smooth_rows(rows, smooth, self.names)
    bad = sum(r["status"] != "ok" for r in rows)
    logging.info("%s: %d rows, %d without a prediction", name, len(rows), bad)
    return rows

  def columns(self, videos: bool = False, smooth: bool = False) -> list[str]:
    """Output columns; ``videos`` adds frame, time and track (empty on photo
    rows), ``smooth`` the smoothed columns after the raw ones."""
    return ["path", *(("frame", "time", "track") if videos else ()),
            "face_box", "status", "error", "class", "name",
            *[f"prob_{n}" for n in self.names], "valence", "arousal",
            *(video.SMOOTH_COLUMNS if videos and smooth else ())]


def _box_text(box) -> str:
  return " ".join(f"{v:g}" for v in box)


def _is_video_item(item: Item) -> bool:
  """A video file: by name, when it is a file (not an array or bytes)."""
  return (item.error is None and item.box is None
          and (item.source is None or isinstance(item.source, (str, os.PathLike)))
          and video.is_video(item.path))


# --------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------
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


def opencv_face_detector(min_size: int = 24):
  """OpenCV's frontal-face Haar cascade (the model file ships in the wheel).

  Returns a callable RGB uint8 image -> [(x, y, w, h), ...], largest first.
  """
  cv2 = video.cv2_module()
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
  fileio.write_text(output, text)


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
  flags.DEFINE_float("margin", None, "Face-box margin for boxed inputs "
                     "(a CSV's boxes, --detect_faces); default: the run's "
                     "(data_prep's --margin for its data, in "
                     "run_contract.json).")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when present.")
  flags.DEFINE_bool("detect_faces", False, "Treat image inputs as whole "
                    "photos: find faces with OpenCV's Haar cascade (needs "
                    "affectjax[detect]); one row per face. Videos always "
                    "find faces.")
  flags.DEFINE_float("fps", None, "Videos: frames sampled per second (the "
                     "first frame of each 1/fps s slot); default every frame.")
  flags.DEFINE_float("smooth", None, "Videos: also write an EMA over time "
                     "with this time constant in seconds, per track, beside "
                     "the raw values (*_smooth columns).")
  flags.DEFINE_bool("annotate", False, "Videos: also write a copy with "
                    "boxes, labels and a valence/arousal dial into the "
                    "video's folder beside --output.")


def main(argv) -> None:
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("Give at least one INPUT: image files, directories, "
                         "a boxes CSV or video files.")
  f = flags.FLAGS
  for name in ("fps", "smooth"):
    if f[name].value is not None and not f[name].value > 0:
      raise app.UsageError(f"--{name} must be > 0, got {f[name].value}")
  items = expand_inputs(inputs, f.image_root)
  videos = [it.path for it in items if _is_video_item(it)]
  detector = opencv_face_detector() if f.detect_faces else None
  if videos:
    video.cv2_module()  # Before the model loads: say what to install.
  predictor = Predictor.from_workdir(f.workdir, checkpoint=f.checkpoint,
                                     use_ema=f.use_ema,
                                     batch_size=f.batch_size, tta=f.tta,
                                     margin=f.margin, face_detector=detector)
  rows = predictor.predict(items, progress=True, fps=f.fps, smooth=f.smooth)
  write_rows(rows, predictor.columns(videos=bool(videos),
                                     smooth=bool(f.smooth)), f.output)
  faceless = sum(r["status"] != "ok" and r["error"].startswith("no_face")
                 for r in rows)
  bad = sum(r["status"] != "ok" for r in rows) - faceless
  notes = ([f"{bad} could not be read"] if bad else []) + (
      [f"{faceless} without a face"] if faceless else [])
  print(f"Wrote {len(rows)} predictions to {f.output}"
        + (f" ({'; '.join(notes)}; see their 'error' column)" if notes
           else ""), flush=True)
  taken = set()
  for path in videos:
    own = [r for r in rows if r["path"] == path]
    folder = video.output_dir(f.output, path, taken)
    if not any(r["status"] == "ok" for r in own):
      print(f"{path}: no face predicted, no pictures "
            f"({own[0]['error'] if own else 'no frames'})", flush=True)
      continue
    written = video.plot_tracks(own, predictor.names, folder,
                                title=os.path.basename(path))
    if f.annotate:
      written.append(video.write_annotated(
          path, own, folder / (epath.Path(path).stem + video.ANNOTATED_SUFFIX),
          f.fps))
    print(f"{path}: {len(written)} file(s) in {folder}", flush=True)


def run() -> None:
  _define_flags()
  app.run(cli.tool(main, "affectjax.predict"), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
