"""Faces followed over a video: track ids, smoothing, per-track summaries.

  IouTracker                    faces of consecutive sampled frames -> track ids
  ema(state, t, x, seconds)     one causal smoothing step
  centred_mean(history, t, s)   the zero-lag mean over the s seconds around t
  smooth_rows(rows, s, names)   either smoothing over a list of rows, per track
  TrackLog                      per-track summaries of a video's rows
  TrackLog.write_csv(path)      tracks.csv: one row per track

Tracking (``IouTracker``): the boxes of each sampled frame are matched to
the tracks alive at that time by intersection over union (IoU), one to one,
maximizing the total IoU (``scipy.optimize.linear_sum_assignment``); a pair
with IoU below ``min_iou`` (0.3) is no match. A face left unmatched starts a
new track (ids 1, 2, ... per video, in order of appearance); a track unseen
for more than ``max_gap`` seconds (1 s) ends (``ended`` lists it), so a face
that returns later gets a new id. A track is compared with its last box
only: at a low ``--fps`` a fast-moving face can move past IoU 0.3 between
samples and be given a new id.

Smoothing, per track, of the class probabilities, valence and arousal
(``class_smooth``, ``name_smooth`` are the smoothed probabilities' argmax):

- ``causal`` (live use): an exponential moving average over time with time
  constant ``seconds``: ``s += alpha * (x - s)``, ``alpha = 1 - exp(-dt /
  seconds)`` for the time ``dt`` since the track's previous face, so the
  result does not depend on the frame rate or the sampling, and a step
  change reaches 63% of its height after ``seconds``; it lags by about
  ``seconds``.
- ``centred`` (offline analysis): the mean of the track's faces within
  ``seconds / 2`` before and after the frame: no lag, a step change is at
  half height exactly where it happens. A row waits for the faces up to
  ``seconds / 2`` after it (or the end of its track).

``TrackLog`` keeps, per track, compact arrays (frame, time, class, valence,
arousal, box, smoothed values; about 70 bytes a face) instead of the rows
themselves: the track pictures, the annotated copy and ``tracks.csv`` are
made from it, so a long video does not keep its rows in memory.
"""
from __future__ import annotations

import array
import csv
import io
import math
from typing import Iterable, Sequence

import numpy as np

from affectjax import fileio

SMOOTH_COLUMNS = ("class_smooth", "name_smooth", "valence_smooth",
                  "arousal_smooth")
SMOOTH_MODES = ("causal", "centred")
TRACK_COLUMNS = ("track", "first_time", "last_time", "frames",
                 "mean_valence", "mean_arousal", "class", "name", "share")


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
  """Track ids for the faces of consecutive frames (module docstring).

  ``ended``: ids of the tracks that ended (unseen for over ``max_gap``),
  in order; the caller may clear it.
  """

  def __init__(self, min_iou: float = 0.3, max_gap: float = 1.0):
    self.min_iou = min_iou
    self.max_gap = max_gap
    self._tracks: dict[int, tuple[np.ndarray, float]] = {}  # id: (box, time)
    self._next = 1
    self.ended: list[int] = []

  def update(self, boxes: Sequence, time: float) -> list[int]:
    """The track id of each box of the frame at ``time`` (seconds); call it
    for every sampled frame, with no boxes too, so tracks end on time."""
    from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
    for k, (_, t) in list(self._tracks.items()):
      if time - t > self.max_gap:
        del self._tracks[k]
        self.ended.append(k)
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

  def alive(self) -> list[int]:
    return list(self._tracks)


# --------------------------------------------------------------------------
# Smoothing.
# --------------------------------------------------------------------------
def values(row: dict, names: Sequence[str]) -> np.ndarray:
  """A face row's smoothed quantities: class probabilities, valence, arousal."""
  return np.asarray([row[f"prob_{n}"] for n in names]
                    + [row["valence"], row["arousal"]], np.float64)


def ema(state, time: float, x: np.ndarray, seconds: float):
  """One causal step: ``state`` (time, value) or None -> the new state."""
  if state is None:
    return time, x
  t0, s = state
  alpha = 1.0 - math.exp(-max(0.0, time - t0) / seconds)
  return time, s + alpha * (x - s)


def centred_mean(history: Iterable[tuple[float, np.ndarray]], time: float,
                 seconds: float) -> np.ndarray:
  """Mean of the (time, value) pairs within ``seconds / 2`` of ``time``."""
  half = seconds / 2 + 1e-9
  near = [x for t, x in history if abs(t - time) <= half]
  return np.mean(near, axis=0)


def set_smoothed(row: dict, s: np.ndarray, names: Sequence[str]) -> None:
  c = int(np.argmax(s[:len(names)]))
  row.update(class_smooth=c, name_smooth=names[c],
             valence_smooth=float(s[-2]), arousal_smooth=float(s[-1]))


def smooth_rows(rows: list[dict], seconds: float, names: Sequence[str],
                mode: str = "causal") -> None:
  """Adds ``SMOOTH_COLUMNS`` to the ``ok`` face rows of a list, per (video,
  track), in place (the module docstring's two modes)."""
  if not seconds > 0:
    raise ValueError(f"--smooth must be > 0 seconds, got {seconds}")
  if mode not in SMOOTH_MODES:
    raise ValueError(f"smoothing mode must be one of {SMOOTH_MODES}, got {mode!r}")
  by_track: dict = {}
  for row in rows:
    if row.get("status") == "ok" and row.get("track") not in (None, ""):
      by_track.setdefault((row["path"], row["track"]), []).append(row)
  for tr in by_track.values():
    xs = [(r["time"], values(r, names)) for r in tr]
    state = None
    for r, (t, x) in zip(tr, xs):
      if mode == "causal":
        state = ema(state, t, x, seconds)
        set_smoothed(r, state[1], names)
      else:
        set_smoothed(r, centred_mean(xs, t, seconds), names)


# --------------------------------------------------------------------------
# Per-track summaries.
# --------------------------------------------------------------------------
class Track:
  """One track's faces as compact arrays (``TrackLog``)."""

  def __init__(self, num_classes: int):
    self.frame = array.array("q")
    self.time = array.array("d")
    self.cls = array.array("h")
    self.valence = array.array("d")
    self.arousal = array.array("d")
    self.box = array.array("f")  # x, y, w, h per face.
    self.cls_smooth = array.array("h")  # -1 without smoothing.
    self.valence_smooth = array.array("d")  # NaN without smoothing.
    self.arousal_smooth = array.array("d")
    self.counts = np.zeros(num_classes, np.int64)

  def __len__(self) -> int:
    return len(self.time)

  def add(self, row: dict) -> None:
    self.frame.append(int(row["frame"]))
    self.time.append(float(row["time"]))
    self.cls.append(int(row["class"]))
    self.valence.append(float(row["valence"]))
    self.arousal.append(float(row["arousal"]))
    self.box.extend(float(v) for v in str(row["face_box"]).split())
    smoothed = row.get("class_smooth") not in (None, "")
    self.cls_smooth.append(int(row["class_smooth"]) if smoothed else -1)
    self.valence_smooth.append(float(row["valence_smooth"]) if smoothed
                               else math.nan)
    self.arousal_smooth.append(float(row["arousal_smooth"]) if smoothed
                               else math.nan)
    self.counts[int(row["class"])] += 1

  @property
  def smoothed(self) -> bool:
    return len(self) > 0 and self.cls_smooth[0] >= 0

  def face(self, i: int) -> dict:
    """Face ``i`` as the fields the annotated copy draws."""
    b = self.box[4 * i:4 * i + 4]
    return dict(frame=self.frame[i], box=tuple(b), cls=self.cls[i],
                valence=self.valence[i], arousal=self.arousal[i],
                cls_smooth=self.cls_smooth[i],
                valence_smooth=self.valence_smooth[i],
                arousal_smooth=self.arousal_smooth[i])


class TrackLog:
  """Per-track summaries of one video's rows (module docstring)."""

  def __init__(self, names: Sequence[str]):
    self.names = list(names)
    self.tracks: dict[int, Track] = {}

  @classmethod
  def from_rows(cls, rows: Iterable[dict], names: Sequence[str]) -> "TrackLog":
    log = cls(names)
    for r in rows:
      log.add(r)
    return log

  def add(self, row: dict) -> None:
    """Takes a row if it is a predicted face on a track; ignores others."""
    if row.get("status") != "ok" or row.get("track") in (None, ""):
      return
    tid = int(row["track"])
    if tid not in self.tracks:
      self.tracks[tid] = Track(len(self.names))
    self.tracks[tid].add(row)

  def __bool__(self) -> bool:
    return bool(self.tracks)

  def table(self) -> list[dict]:
    """One dict per track, in id order (``TRACK_COLUMNS``)."""
    out = []
    for tid in sorted(self.tracks):
      t = self.tracks[tid]
      c = int(np.argmax(t.counts))
      out.append(dict(track=tid, first_time=t.time[0], last_time=t.time[-1],
                      frames=len(t), mean_valence=float(np.mean(t.valence)),
                      mean_arousal=float(np.mean(t.arousal)), **{"class": c},
                      name=self.names[c], share=float(t.counts[c] / len(t))))
    return out

  def write_csv(self, path) -> None:
    """``tracks.csv``: ``TRACK_COLUMNS``, one row per track."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TRACK_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in self.table():
      w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v)
                  for k, v in r.items()})
    fileio.write_text(path, buf.getvalue())
