"""One video through predict: faces found, followed and predicted, rows as
they come (``Predictor.predict_video`` and the command line use it).

  iter_rows(predictor, path, ...)   the video's rows, in frame order, lazily

Each sampled frame (``affectjax.video.VideoReader``) goes through the face
detector (``affectjax.face_detect``); its faces are linked to tracks
(``affectjax.tracks.IouTracker``), cropped exactly as a photo with that box
would be (``Predictor.load``: data_prep's crop) and run through the
compiled model ``batch_size`` crops at a time.

Rows leave in frame order as soon as they are final, so memory stays flat
on long videos and a stopped run has written its rows up to a few frames
before where it stopped. A row is final when:

- its face's prediction is back (the batch it is in was run);
- its track is decided: it reached ``min_track_frames`` faces (kept), or it
  ended (unseen for 1 s) or the video ended before that: then each of its
  rows becomes ``status=error``, ``short_track: ...`` (prediction columns
  empty; the box and score stay): a face seen in only one or two frames is
  most often a false detection;
- with ``smooth_mode="centred"``: its track's faces up to ``smooth / 2``
  seconds later are predicted (or the track ended).

So rows wait at most about a batch of faces, ``min_track_frames`` sampled
frames or 1 s of video, and ``smooth / 2`` seconds with centred smoothing.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterator

import numpy as np
from absl import logging

from affectjax import face_detect
from affectjax import scoring
from affectjax import tracks
from affectjax import video

MIN_TRACK_FRAMES = 3

_PREDICTION_KEYS = ("class", "name", "valence", "arousal",
                    *tracks.SMOOTH_COLUMNS)


@dataclasses.dataclass
class _TrackState:
  faces: int = 0  # Faces detected on the track so far.
  decided: str | None = None  # None, "kept" or "short".
  ema: tuple | None = None  # Causal smoothing state.
  done_time: float = -np.inf  # Time of its last row whose prediction is back.
  ended: bool = False
  history: collections.deque = dataclasses.field(
      default_factory=collections.deque)  # (time, values) for centred.
  waiting: collections.deque = dataclasses.field(
      default_factory=collections.deque)  # Rows waiting for centred values.
  rows: list = dataclasses.field(default_factory=list)  # Undecided rows.


def box_text(box) -> str:
  return " ".join(f"{v:g}" for v in box)


def iter_rows(predictor, path, *, fps: float | None = None,
              smooth: float | None = None, smooth_mode: str = "causal",
              min_track_frames: int = MIN_TRACK_FRAMES, progress: bool = False,
              name: str | None = None) -> Iterator[dict]:
  """The rows of one video (``Predictor.predict_video`` documents them).

  Raises ``video.VideoError`` naming the file when it cannot be opened.
  """
  if smooth is not None and not smooth > 0:
    raise ValueError(f"smooth must be > 0 seconds, got {smooth}")
  if smooth_mode not in tracks.SMOOTH_MODES:
    raise ValueError(f"smooth_mode must be one of {tracks.SMOOTH_MODES}")
  name = str(path) if name is None else name
  names = predictor.names
  detector = predictor.video_detector()
  tracker = tracks.IouTracker()
  state: dict[int, _TrackState] = {}
  queue: collections.deque = collections.deque()  # Rows not yet released.
  pending: list = []  # (row, crop or None) waiting for the model, in order.
  centred = bool(smooth) and smooth_mode == "centred"
  stats = collections.Counter()

  def mark_short(tid: int) -> None:
    st = state[tid]
    st.decided = "short"
    stats["short_tracks"] += 1
    for row in st.rows:
      row["_short"] = True
      for k in _PREDICTION_KEYS + tuple(f"prob_{n}" for n in names):
        row.pop(k, None)
      row.update(status="error", error=(
          f"short_track: track {tid} has {st.faces} face(s), fewer than "
          f"--min_track_frames={min_track_frames} (most often a false "
          "detection)"))
    st.rows = []

  def decide(tid: int, final: bool = False) -> None:
    st = state[tid]
    if st.decided is None:
      if st.faces >= min_track_frames:
        st.decided, st.rows = "kept", []
      elif final:
        mark_short(tid)

  def do_centred(st: _TrackState, final: bool) -> None:
    while st.waiting:
      row = st.waiting[0]
      if not final and st.done_time <= row["time"] + smooth / 2:
        break
      if not row.get("_short"):
        tracks.set_smoothed(row, tracks.centred_mean(st.history, row["time"],
                                                     smooth), names)
      row["_centred"] = False
      st.waiting.popleft()
    keep_from = (st.waiting[0]["time"] if st.waiting else st.done_time
                 ) - smooth / 2 - 1e-6
    while st.history and st.history[0][0] < keep_from:
      st.history.popleft()

  def flush() -> None:
    crops = [c for _, c in pending if c is not None]
    if crops:
      logits, va = predictor.predict_arrays(np.stack(crops))
      probs = iter(scoring.softmax(logits))
      va = iter(va)
    for row, crop in pending:
      st = state[row["track"]]
      if crop is not None:
        p, v = next(probs), next(va)
        if not row.get("_short"):
          predictor.fill(row, p, v)
          x = tracks.values(row, names)
          if smooth and not centred:
            st.ema = tracks.ema(st.ema, row["time"], x, smooth)
            tracks.set_smoothed(row, st.ema[1], names)
          elif centred:
            st.history.append((row["time"], x))
      row["_model"] = False
      st.done_time = row["time"]
    pending.clear()
    if centred:
      for st in state.values():
        if st.waiting:
          do_centred(st, st.ended)

  def ready(row: dict) -> bool:
    if row.get("_model"):
      return False
    tid = row.get("track")
    if tid is None:
      return True
    st = state[tid]
    return st.decided == "short" or (st.decided == "kept"
                                     and not row.get("_centred"))

  def release() -> Iterator[dict]:
    while queue and ready(queue[0]):
      row = queue.popleft()
      for k in ("_model", "_centred", "_short"):
        row.pop(k, None)
      stats["rows"] += 1
      stats["ok"] += row["status"] == "ok"
      yield row

  def end_tracks(ids) -> None:
    # Ended tracks (or all at the video's end): decided; centred values
    # computed unless some of their faces still wait for the model.
    for tid in ids:
      st = state.get(tid)
      if st is None:
        continue
      st.ended = True
      decide(tid, final=True)
      if centred and st.waiting and not any(
          row.get("track") == tid for row, _ in pending):
        do_centred(st, True)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with video.VideoReader(path, fps) as reader:
    bar = tqdm(total=reader.count, unit="frame", desc=os.path.basename(name),
               disable=None if progress else True)
    for frame in reader:
      bar.update(frame.index + 1 - bar.n)
      base = {"path": name, "frame": frame.index,
              "time": round(frame.time, 6), "track": None, "face_box": "",
              "face_score": None}
      if frame.image is None:
        queue.append({**base, "status": "error", "error": frame.error})
        yield from release()
        continue
      found = [face_detect.as_detection(d) for d in detector(frame.image)]
      ids = tracker.update([d[:4] for d in found], frame.time)
      if tracker.ended:
        ended, tracker.ended = tracker.ended, []
        end_tracks(ended)
      if not found:
        queue.append({**base, "status": "error", "error":
                      "no_face: the face detector found no face in this frame"})
      for det, tid in zip(found, ids):
        st = state.setdefault(tid, _TrackState())
        st.faces += 1
        row = {**base, "track": tid, "face_box": box_text(det[:4]),
               "face_score": det.score, "_model": True, "_centred": centred}
        crop, err = predictor.load_or_error_box(frame.image, det[:4], name)
        if err is not None:
          row.update(status="error", error=err, _centred=False)
        queue.append(row)
        pending.append((row, crop if err is None else None))
        if st.decided is None:
          st.rows.append(row)
        if centred and err is None:
          st.waiting.append(row)
        decide(tid)
      if len(pending) >= predictor.batch_size:
        flush()
      yield from release()
    flush()
    end_tracks(list(state))
    yield from release()
    bar.close()
  assert not queue, "rows left unreleased"
  if not stats["rows"]:  # Opened, but not one frame came out: say so.
    yield {"path": name, "frame": None, "time": None, "track": None,
           "face_box": "", "face_score": None, "status": "error",
           "error": "no_frames: the video opened but no frame could be read "
                    "from it"}
  logging.info("%s: %d rows, %d without a prediction, %d short track(s)",
               name, stats["rows"], stats["rows"] - stats["ok"],
               stats["short_tracks"])
