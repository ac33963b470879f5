"""Videos for predict: frames read and sampled, faces followed, traces drawn.

  VideoReader(path, fps=None)   frames in order: index, time, RGB or the reason
  IouTracker                    faces of consecutive sampled frames -> track ids
  smooth_rows(rows, seconds)    EMA over time per track, beside the raw values
  plot_tracks(rows, ...)        one PNG per track: expression timeline, V/A trace
  write_annotated(...)          a copy of the video with boxes, labels, a V/A dial
  output_dir(output, video)     where a video's pictures go (beside the table)

``affectjax.predict`` does the rest with the photo path's own pieces: each
face of a sampled frame is cropped by ``Predictor.load`` (``face_crop``, as
data_prep crops) and the crops go to the compiled forward pass in batches
(``Predictor.predict_arrays``).

Decoding is OpenCV's (``cv2.VideoCapture``; the ``detect`` extra,
``opencv-python-headless>=4.8,<5``, whose wheel bundles FFmpeg's decoders:
mp4, mkv, avi, webm, mov; nothing is downloaded at run time), and so is the
annotated copy (``cv2.VideoWriter``, MPEG-4 part 2 in .mp4, the encoder that
wheel ships). A video on gs:// or another remote ``epath`` is copied to a
local temporary file first (FFmpeg reads local files here).

Frame rows. Every sampled frame gets at least one row: one per face found,
or one saying why there is none: ``no_face`` (the detector found nothing)
or ``unreadable_frame`` (the decoder returned no picture for a frame before
the end the container announces, e.g. a damaged packet or a truncated
file). A bad frame never stops the run; a file that cannot be opened at all
raises ``VideoError`` naming it.

Sampling (``fps``): ``None`` keeps every frame. ``fps=N`` cuts time into
slots of 1/N s (slot k = floor(t * N)) and keeps the first frame of each
slot, by the frame's own timestamp, so variable-rate videos sample evenly
too. Frames that are skipped are only grabbed, not converted.

Tracking (``IouTracker``): the boxes of each sampled frame are matched to
the tracks alive at that time by intersection over union (IoU), one to one,
maximizing the total IoU (``scipy.optimize.linear_sum_assignment``); a pair
with IoU below ``min_iou`` (0.3) is no match. A face left unmatched starts a
new track (ids 1, 2, ... per video, in order of appearance); a track unseen
for more than ``max_gap`` seconds (1 s) ends, so a face that returns later
gets a new id. A track is compared with its last box only: at a low
``--fps`` a fast-moving face can move past IoU 0.3 between samples and be
given a new id.

Smoothing (``smooth_rows``): per track, an exponential moving average over
time with time constant ``seconds``: ``s += alpha * (x - s)``, ``alpha = 1 -
exp(-dt / seconds)`` for the time ``dt`` since the track's previous face, so
the result does not depend on the frame rate or the sampling, and a step
change reaches 63% of its height after ``seconds``. It smooths the class
probabilities (``class_smooth``, ``name_smooth`` are their argmax),
``valence_smooth`` and ``arousal_smooth``; the raw values stay in their own
columns.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
from absl import logging
from etils import epath

from affectjax import fileio

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")
SMOOTH_COLUMNS = ("class_smooth", "name_smooth", "valence_smooth",
                  "arousal_smooth")
ANNOTATED_SUFFIX = "_annotated.mp4"


class VideoError(ValueError):
  """A video file that cannot be opened (missing, corrupt, not a video)."""


def is_video(path) -> bool:
  return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def cv2_module():
  """OpenCV, or an ImportError that says how to install it."""
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "Video inputs and --detect_faces need OpenCV 4: pip install "
        "'affectjax[detect]' (or 'opencv-python-headless>=4.8,<5').") from None
  return cv2


@contextlib.contextmanager
def _local_file(path) -> Iterator[str]:
  """A local filesystem path for ``path`` (remote epaths copied to a temp file)."""
  if "://" not in os.fspath(path):
    yield os.fspath(epath.Path(path).expanduser())
    return
  p = epath.Path(path)
  with tempfile.NamedTemporaryFile(suffix=p.suffix) as tmp:
    tmp.write(p.read_bytes())
    tmp.flush()
    yield tmp.name


@dataclasses.dataclass
class Frame:
  """One sampled frame: its position and picture, or why there is none."""
  index: int  # Position in the video, 0-based, counting every frame.
  time: float  # Seconds from the start (the frame's timestamp).
  image: np.ndarray | None  # uint8 (H, W, 3) RGB; None when unreadable.
  error: str | None = None


class VideoReader:
  """The sampled frames of one video file, in order (module docstring).

  Attributes (after opening): ``rate`` (frames/s the container announces,
  or None), ``count`` (frames it announces, or None), ``width``, ``height``.
  Raises ``VideoError`` naming the file if it cannot be opened.
  """

  def __init__(self, path, fps: float | None = None):
    if fps is not None and not fps > 0:
      raise ValueError(f"fps must be > 0, got {fps}")
    self.path = os.fspath(path)
    self.fps = fps
    self._stack = contextlib.ExitStack()
    cv2 = cv2_module()
    if not epath.Path(path).exists():
      raise VideoError(f"{self.path}: no such video file")
    local = self._stack.enter_context(_local_file(path))
    self._cap = cv2.VideoCapture(local)
    if not self._cap.isOpened():
      self._stack.close()
      raise VideoError(
          f"{self.path}: cannot be opened as a video (corrupt, truncated "
          "before its header, or not a video); FFmpeg in OpenCV reads mp4, "
          "mkv, avi, webm and mov")
    self._stack.callback(self._cap.release)
    rate = self._cap.get(cv2.CAP_PROP_FPS)
    self.rate = float(rate) if rate and math.isfinite(rate) and rate > 0 else None
    count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    self.count = count if count > 0 else None
    self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self._stack.close()

  def __iter__(self) -> Iterator[Frame]:
    cv2 = cv2_module()
    cap, index, time, slot = self._cap, -1, None, None
    step = 1.0 / self.rate if self.rate else 0.0
    try:
      while True:
        try:
          ok = cap.grab()
        except cv2.error:
          ok = False
        index += 1
        if not ok:
          # No frame. Before the announced end: a frame that cannot be
          # decoded, and the next grab reads on. Otherwise: the end.
          if self.count is None or index >= self.count:
            return
          time = index * step if time is None else time + step
          if self._sampled(time, slot):
            slot = self._slot(time)
            yield Frame(index, time, None, (
                "unreadable_frame: the decoder returned no picture for this "
                f"frame (the container announces {self.count} frames)"))
          continue
        msec = cap.get(cv2.CAP_PROP_POS_MSEC)
        time = (msec / 1000.0 if msec is not None and math.isfinite(msec)
                and (msec > 0 or index == 0) else index * step)
        if not self._sampled(time, slot):
          continue
        slot = self._slot(time)
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
          yield Frame(index, time, None, "unreadable_frame: the decoder "
                      "returned no picture for this frame")
          continue
        yield Frame(index, time, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
      self.close()

  def _slot(self, time: float) -> int | None:
    return None if self.fps is None else math.floor(time * self.fps + 1e-6)

  def _sampled(self, time: float, last_slot: int | None) -> bool:
    return self.fps is None or last_slot is None or self._slot(time) > last_slot


# --------------------------------------------------------------------------
# Tracking.
# --------------------------------------------------------------------------
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of every (x, y, w, h) box in ``a`` (N, 4) with every one in ``b`` (M, 4)."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  x0 = np.maximum(a[:, None, 0], b[None, :, 0])
  y0 = np.maximum(a[:, None, 1], b[None, :, 1])
  x1 = np.minimum((a[:, 0] + a[:, 2])[:, None], (b[:, 0] + b[:, 2])[None])
  y1 = np.minimum((a[:, 1] + a[:, 3])[:, None], (b[:, 1] + b[:, 3])[None])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class IouTracker:
  """Track ids for the faces of consecutive frames (module docstring)."""

  def __init__(self, min_iou: float = 0.3, max_gap: float = 1.0):
    self.min_iou = min_iou
    self.max_gap = max_gap
    self._tracks: dict[int, tuple[np.ndarray, float]] = {}  # id: (box, time)
    self._next = 1

  def update(self, boxes: Sequence, time: float) -> list[int]:
    """The track id of each box of the frame at ``time`` (seconds)."""
    from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
    self._tracks = {k: v for k, v in self._tracks.items()
                    if time - v[1] <= self.max_gap}
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ids: list[int | None] = [None] * len(boxes)
    alive = list(self._tracks)
    if alive and len(boxes):
      iou = iou_matrix(np.stack([self._tracks[k][0] for k in alive]), boxes)
      for r, c in zip(*linear_sum_assignment(iou, maximize=True)):
        if iou[r, c] >= self.min_iou:
          ids[c] = alive[r]
    for j, box in enumerate(boxes):
      if ids[j] is None:
        ids[j], self._next = self._next, self._next + 1
      self._tracks[ids[j]] = (box, time)
    return ids


# --------------------------------------------------------------------------
# Smoothing.
# --------------------------------------------------------------------------
def smooth_rows(rows: list[dict], seconds: float, names: Sequence[str]
                ) -> None:
  """Adds ``SMOOTH_COLUMNS`` to the ``ok`` rows, per (video, track), in place."""
  if not seconds > 0:
    raise ValueError(f"--smooth must be > 0 seconds, got {seconds}")
  state: dict = {}
  for row in rows:
    if row.get("status") != "ok" or row.get("track") in (None, ""):
      continue
    x = np.asarray([row[f"prob_{n}"] for n in names]
                   + [row["valence"], row["arousal"]], np.float64)
    key = (row["path"], row["track"])
    if key in state:
      t0, s = state[key]
      alpha = 1.0 - math.exp(-max(0.0, row["time"] - t0) / seconds)
      s = s + alpha * (x - s)
    else:
      s = x
    state[key] = (row["time"], s)
    c = int(np.argmax(s[:len(names)]))
    row.update(class_smooth=c, name_smooth=names[c],
               valence_smooth=float(s[-2]), arousal_smooth=float(s[-1]))


# --------------------------------------------------------------------------
# Outputs: where, pictures, the annotated copy.
# --------------------------------------------------------------------------
def output_dir(output, video, taken: set | None = None) -> epath.Path:
  """``OUTPUT_DIR/<video stem>`` beside the table file; ``-2``, ``-3``... when
  another video of the same call already took that name (``taken``)."""
  base = epath.Path(output).parent / epath.Path(video).stem
  d, k = base, 1
  while taken is not None and os.fspath(d) in taken:
    k += 1
    d = base.parent / f"{base.name}-{k}"
  if taken is not None:
    taken.add(os.fspath(d))
  return d


def _tracks(rows: list[dict]) -> dict[int, list[dict]]:
  out = collections.defaultdict(list)
  for r in rows:
    if r.get("status") == "ok" and r.get("track") not in (None, ""):
      out[int(r["track"])].append(r)
  return dict(sorted(out.items()))


def _colour(track: int) -> tuple[int, int, int]:
  """A distinct RGB colour per track id (matplotlib's tab10)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  r, g, b, _ = colormaps["tab10"]((track - 1) % 10)
  return int(r * 255), int(g * 255), int(b * 255)


def plot_tracks(rows: list[dict], names: Sequence[str], out_dir,
                title: str = "") -> list[epath.Path]:
  """One PNG per track, ``out_dir/track_<id>.png``: the predicted expression
  over time (dots; the smoothed class as a line when present) above the
  valence and arousal traces (smoothed ones dashed when present)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  written = []
  for track, tr in _tracks(rows).items():
    t = np.asarray([r["time"] for r in tr])
    cls = np.asarray([r["class"] for r in tr])
    fig = Figure(figsize=(9, 5.5), dpi=80, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    ax1.scatter(t, cls, c=cls, cmap="tab10", vmin=0, vmax=9, s=14, zorder=3,
                label="class")
    if "class_smooth" in tr[0]:
      ax1.step(t, [r["class_smooth"] for r in tr], where="post", color="0.3",
               lw=1, label="smoothed")
      ax1.legend(loc="best", fontsize=8)
    ax1.set_yticks(range(len(names)), names)
    ax1.set_ylim(-0.5, len(names) - 0.5)
    ax1.grid(axis="y", alpha=0.3)
    ax1.set_title(f"{title} track {track}: {len(tr)} frames, "
                  f"{t[0]:.2f}-{t[-1]:.2f} s".strip())
    for key, colour in (("valence", "tab:blue"), ("arousal", "tab:red")):
      ax2.plot(t, [r[key] for r in tr], color=colour, lw=1.2, label=key,
               marker="." if len(tr) < 60 else None)
      if f"{key}_smooth" in tr[0]:
        ax2.plot(t, [r[f"{key}_smooth"] for r in tr], color=colour, lw=1.2,
                 ls="--", label=f"{key} (smoothed)")
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set_ylim(-1.05, 1.05)
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="best", fontsize=8, ncols=2)
    ax2.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = epath.Path(out_dir) / f"track_{track}.png"
    fileio.write_bytes(path, buf.getvalue())
    written.append(path)
  return written


def _draw_face(cv2, bgr: np.ndarray, row: dict) -> None:
  """Box, 'id name' label and a valence/arousal dial beside the box."""
  x, y, w, h = (int(round(float(v))) for v in row["face_box"].split())
  r, g, b = _colour(int(row["track"]))
  colour = (b, g, r)
  height, width = bgr.shape[:2]
  thick = max(1, round(min(width, height) / 300))
  cv2.rectangle(bgr, (x, y), (x + w, y + h), colour, thick)
  name = row.get("name_smooth") or row["name"]
  label = f"{row['track']} {name}"
  scale = max(0.35, min(width, height) / 900)
  (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
  ty = y - 3 if y - th - base - 3 >= 0 else y + h + th + 3
  cv2.rectangle(bgr, (x, ty - th - base), (x + tw + 2, ty + base // 2),
                colour, -1)
  cv2.putText(bgr, label, (x + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
              (255, 255, 255), 1, cv2.LINE_AA)
  # The dial: valence to the right, arousal up, the unit circle as its rim.
  rad = int(max(8, min(28, w / 4)))
  cx = x + w + rad + 4 if x + w + 2 * rad + 4 < width else x - rad - 4
  cx = int(min(max(cx, rad), width - rad - 1))
  cy = int(min(max(y + rad, rad), height - rad - 1))
  cv2.circle(bgr, (cx, cy), rad, (40, 40, 40), -1, cv2.LINE_AA)
  cv2.circle(bgr, (cx, cy), rad, (230, 230, 230), 1, cv2.LINE_AA)
  cv2.line(bgr, (cx - rad, cy), (cx + rad, cy), (140, 140, 140), 1)
  cv2.line(bgr, (cx, cy - rad), (cx, cy + rad), (140, 140, 140), 1)
  v = float(row.get("valence_smooth", row["valence"]))
  a = float(row.get("arousal_smooth", row["arousal"]))
  dot = (int(round(cx + v * rad)), int(round(cy - a * rad)))
  cv2.circle(bgr, dot, max(2, rad // 5), colour, -1, cv2.LINE_AA)


def write_annotated(video, rows: list[dict], out_file, fps: float | None = None
                    ) -> epath.Path:
  """The sampled frames of ``video`` with each row's face drawn on them.

  Decodes the video again with the same sampling (so frame indices match
  the rows); written at the sampled rate (``fps``, else the video's), as
  MPEG-4 in .mp4, to a temporary name, then renamed. A frame whose rows say
  it was unreadable is written black with that word on it.
  """
  cv2 = cv2_module()
  by_frame = collections.defaultdict(list)
  for r in rows:
    if r.get("status") == "ok" and r.get("face_box"):
      by_frame[int(r["frame"])].append(r)
  out_file = epath.Path(out_file)
  with VideoReader(video, fps) as reader, tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "annotated.mp4")
    rate = fps or reader.rate or 25.0
    size = (reader.width, reader.height)
    writer = cv2.VideoWriter(local, cv2.VideoWriter_fourcc(*"mp4v"), rate, size)
    if not writer.isOpened():
      raise OSError(f"OpenCV cannot write an mp4 of {size} for {video}")
    try:
      for frame in reader:
        if frame.image is None:
          bgr = np.zeros((size[1], size[0], 3), np.uint8)
          cv2.putText(bgr, "unreadable", (8, size[1] // 2),
                      cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        else:
          bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
        for r in by_frame.get(frame.index, ()):
          _draw_face(cv2, bgr, r)
        writer.write(bgr)
    finally:
      writer.release()
    with open(local, "rb") as f:
      fileio.write_bytes(out_file, f.read())
  logging.info("Wrote %s", out_file)
  return out_file
