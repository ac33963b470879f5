"""Video files for predict: opened, read to the decoder's end, sampled.

  VideoReader(path, fps=None)   frames in order: index, time, RGB or the reason
  local_copy(path)              a local path for a video (gs:// copied once)
  is_video(path), cv2_module()  by name; OpenCV or how to install it

The rest of the video path lives beside it: ``affectjax.video_predict``
(faces found, followed and predicted, rows as they come),
``affectjax.tracks`` (tracking, smoothing, per-track summaries and
``tracks.csv``), ``affectjax.video_pictures`` (track pictures, the
annotated copy).

Decoding is OpenCV's (``cv2.VideoCapture``; the ``detect`` extra,
``opencv-python-headless>=4.8,<5``, whose wheel bundles FFmpeg's decoders:
mp4, mkv, avi, webm, mov; nothing is downloaded at run time). A video on
gs:// or another remote ``epath`` is streamed in 1 MiB chunks to a local
temporary file (FFmpeg reads local files here); predict's command line
makes that copy once per video and reads it for the rows and again for the
annotated copy.

The file's own facts:

- The end is where the decoder ends, not the frame count the container
  announces (for mkv/webm files that store none, OpenCV estimates it from
  the duration). A frame the decoder cannot read (``grab`` fails) is only
  reported as ``unreadable_frame`` when a later frame decodes again; after
  ``MAX_BAD_RUN`` failures in a row the stream has ended. An end well
  before the announced count is logged.
- Rotation metadata (a phone's portrait video: an mp4 display matrix) is
  applied: ``CAP_PROP_ORIENTATION_AUTO`` is set explicitly, because its
  default changed between OpenCV 4.x releases and the pin allows all of
  them. Frames, boxes and the annotated copy are upright; ``rotation``
  says what the file asked for.

Frame rows. Every sampled frame gets at least one row: one per face found,
or one saying why there is none: ``no_face`` or ``unreadable_frame``. A bad
frame never stops the run; a file that cannot be opened at all raises
``VideoError`` naming it.

Sampling (``fps``): ``None`` keeps every frame. ``fps=N`` cuts time into
slots of 1/N s (slot k = floor(t * N)) and keeps the first frame of each
slot, by the frame's own timestamp, so variable-rate videos sample evenly
too. Frames that are skipped are only grabbed, not converted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
from absl import logging
from etils import epath

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")
# Failed grabs in a row after which the stream has ended (a damaged packet
# costs one or a few; FFmpeg at the end of a file fails every time).
MAX_BAD_RUN = 32


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
def local_copy(path) -> Iterator[str]:
  """A local filesystem path for ``path``: itself when local; a remote epath
  (gs://) streamed to a temporary file, removed on exit."""
  if "://" not in os.fspath(path):
    yield os.fspath(epath.Path(path).expanduser())
    return
  p = epath.Path(path)
  if not p.exists():
    raise VideoError(f"{path}: no such video file")
  with tempfile.NamedTemporaryFile(suffix=p.suffix) as tmp:
    with p.open("rb") as src:
      shutil.copyfileobj(src, tmp, 1 << 20)
    tmp.flush()
    yield tmp.name


@dataclasses.dataclass
class Frame:
  """One sampled frame: its position and picture, or why there is none."""
  index: int  # Position in the video, 0-based, counting every frame.
  time: float  # Seconds from the start (the frame's timestamp).
  image: np.ndarray | None  # uint8 (H, W, 3) RGB, upright; None when unreadable.
  error: str | None = None


class VideoReader:
  """The sampled frames of one video file, in order (module docstring).

  Attributes (after opening): ``rate`` (frames/s the container announces,
  or None), ``count`` (frames it announces or OpenCV estimates, or None;
  the decoder's end wins), ``width``, ``height`` (upright), ``rotation``
  (degrees the file asks for). Raises ``VideoError`` naming the file if it
  cannot be opened.
  """

  def __init__(self, path, fps: float | None = None):
    if fps is not None and not fps > 0:
      raise ValueError(f"fps must be > 0, got {fps}")
    self.path = os.fspath(path)
    self.fps = fps
    self._stack = contextlib.ExitStack()
    cv2 = cv2_module()
    if "://" not in self.path and not epath.Path(path).expanduser().exists():
      raise VideoError(f"{self.path}: no such video file")
    local = self._stack.enter_context(local_copy(path))
    self._cap = cv2.VideoCapture(local)
    if not self._cap.isOpened():
      self._stack.close()
      raise VideoError(
          f"{self.path}: cannot be opened as a video (corrupt, truncated "
          "before its header, or not a video); FFmpeg in OpenCV reads mp4, "
          "mkv, avi, webm and mov")
    self._stack.callback(self._cap.release)
    # Upright frames whatever this OpenCV's default (module docstring).
    self._cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    self.rotation = int(self._cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0)
    rate = self._cap.get(cv2.CAP_PROP_FPS)
    self.rate = float(rate) if rate and math.isfinite(rate) and rate > 0 else None
    count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    self.count = count if count > 0 else None
    self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    self.frames_read = 0  # Frames the decoder gave, once iterated.
    self.end_time = 0.0  # The last frame's time + one frame: the video's end.

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
    bad: list[tuple[int, float]] = []  # Failed grabs since the last frame.
    try:
      while True:
        try:
          ok = cap.grab()
        except cv2.error:
          ok = False
        index += 1
        if not ok:
          # A damaged frame, or the end: only a later frame tells them apart.
          time = index * step if time is None else time + step
          bad.append((index, time))
          if len(bad) >= MAX_BAD_RUN:
            break
          continue
        self.frames_read += 1
        msec = cap.get(cv2.CAP_PROP_POS_MSEC)
        time = (msec / 1000.0 if msec is not None and math.isfinite(msec)
                and (msec > 0 or index == 0) else index * step)
        self.end_time = time + step
        for i, t in bad:  # Frames the decoder skipped before this one.
          if self._sampled(t, slot):
            slot = self._slot(t)
            yield Frame(i, t, None, "unreadable_frame: the decoder returned "
                        "no picture for this frame")
        bad = []
        if not self._sampled(time, slot):
          continue
        slot = self._slot(time)
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
          yield Frame(index, time, None, "unreadable_frame: the decoder "
                      "returned no picture for this frame")
          continue
        yield Frame(index, time, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
      end = index - len(bad) + 1
      if self.count is not None and end < self.count - 1:
        logging.warning(
            "%s: the decoder ended after %d frames; the container announces "
            "%d (an estimate when the file stores none, as mkv/webm often "
            "do; otherwise a truncated file)", self.path, end, self.count)
    finally:
      self.close()

  def _slot(self, time: float) -> int | None:
    return None if self.fps is None else math.floor(time * self.fps + 1e-6)

  def _sampled(self, time: float, last_slot: int | None) -> bool:
    return self.fps is None or last_slot is None or self._slot(time) > last_slot
