"""A video's pictures: per-track plots, ``tracks.csv``, the annotated copy.

  output_dir(output, video)          where a video's files go (beside the table)
  write_all(log, video, folder, ...) tracks.csv, track_<id>.png, the copy
  plot_tracks(log, out_dir)          one PNG per track: expression, V/A trace
  write_annotated(video, log, out)   the sampled frames with boxes, labels, dials

All of them read a ``tracks.TrackLog`` (per-track summaries), not the rows.

The annotated copy is WebM with VP8 (``.webm``), which browsers play: of
the encoders in the ``opencv-python-headless`` wheel's FFmpeg, VP8 and VP9
(in WebM) and MPEG-4 part 2 open; H.264 (``avc1``) and AV1 do not. VP8
encodes about twice as fast as VP9 here. If VP8 cannot be opened, the copy
falls back to MPEG-4 part 2 in ``.mp4`` (which browsers do not play) with a
warning. Timing: the copy runs at the video's own frame rate and shows each
sampled frame from its own timestamp until the next sampled one (or the end
of the video), so it lasts as long as the video and stays in step with it
whatever ``--fps`` picked.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile

import numpy as np
from absl import logging
from etils import epath

from affectjax import fileio
from affectjax import tracks
from affectjax import video

ANNOTATED_SUFFIX = "_annotated.webm"
TRACKS_CSV = "tracks.csv"


def output_dir(output, video_path, taken: set | None = None) -> epath.Path:
  """``OUTPUT_DIR/<video stem>`` beside the table file; ``-2``, ``-3``... when
  another video of the same call already took that name (``taken``)."""
  base = epath.Path(output).parent / epath.Path(video_path).stem
  d, k = base, 1
  while taken is not None and os.fspath(d) in taken:
    k += 1
    d = base.parent / f"{base.name}-{k}"
  if taken is not None:
    taken.add(os.fspath(d))
  return d


def write_all(log: tracks.TrackLog, video_path, folder, *, title: str = "",
              annotate: bool = False, fps: float | None = None
              ) -> list[epath.Path]:
  """``tracks.csv``, the track pictures and (``annotate``) the annotated copy
  of one video into ``folder``; returns the files written."""
  folder = epath.Path(folder)
  log.write_csv(folder / TRACKS_CSV)
  written = [folder / TRACKS_CSV]
  written += plot_tracks(log, folder, title=title)
  if annotate:
    written.append(write_annotated(
        video_path, log, folder / (epath.Path(title or video_path).stem
                                   + ANNOTATED_SUFFIX), fps))
  return written


def _colour(track: int) -> tuple[int, int, int]:
  """A distinct RGB colour per track id (matplotlib's tab10)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  r, g, b, _ = colormaps["tab10"]((track - 1) % 10)
  return int(r * 255), int(g * 255), int(b * 255)


def plot_tracks(log: tracks.TrackLog, out_dir, title: str = ""
                ) -> list[epath.Path]:
  """One PNG per track, ``out_dir/track_<id>.png``: the predicted expression
  over time (dots; the smoothed class as a line when present) above the
  valence and arousal traces (smoothed ones dashed when present)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  names = log.names
  written = []
  for tid, tr in sorted(log.tracks.items()):
    t = np.frombuffer(tr.time, np.float64)
    cls = np.frombuffer(tr.cls, np.int16)
    fig = Figure(figsize=(9, 5.5), dpi=80, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    ax1.scatter(t, cls, c=cls, cmap="tab10", vmin=0, vmax=9, s=14, zorder=3,
                label="class")
    if tr.smoothed:
      ax1.step(t, np.frombuffer(tr.cls_smooth, np.int16), where="post",
               color="0.3", lw=1, label="smoothed")
      ax1.legend(loc="best", fontsize=8)
    ax1.set_yticks(range(len(names)), names)
    ax1.set_ylim(-0.5, len(names) - 0.5)
    ax1.grid(axis="y", alpha=0.3)
    ax1.set_title(f"{title} track {tid}: {len(tr)} frames, "
                  f"{t[0]:.2f}-{t[-1]:.2f} s".strip())
    for key, colour in (("valence", "tab:blue"), ("arousal", "tab:red")):
      ax2.plot(t, np.frombuffer(getattr(tr, key), np.float64), color=colour,
               lw=1.2, label=key, marker="." if len(tr) < 60 else None)
      if tr.smoothed:
        ax2.plot(t, np.frombuffer(getattr(tr, f"{key}_smooth"), np.float64),
                 color=colour, lw=1.2, ls="--", label=f"{key} (smoothed)")
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set_ylim(-1.05, 1.05)
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="best", fontsize=8, ncols=2)
    ax2.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = epath.Path(out_dir) / f"track_{tid}.png"
    fileio.write_bytes(path, buf.getvalue())
    written.append(path)
  return written


def _draw_face(cv2, bgr: np.ndarray, tid: int, face: dict,
               names) -> None:
  """Box, 'id name' label and a valence/arousal dial beside the box."""
  x, y, w, h = (int(round(v)) for v in face["box"])
  r, g, b = _colour(tid)
  colour = (b, g, r)
  height, width = bgr.shape[:2]
  thick = max(1, round(min(width, height) / 300))
  cv2.rectangle(bgr, (x, y), (x + w, y + h), colour, thick)
  smoothed = face["cls_smooth"] >= 0
  name = names[face["cls_smooth"] if smoothed else face["cls"]]
  label = f"{tid} {name}"
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
  v = face["valence_smooth"] if smoothed else face["valence"]
  a = face["arousal_smooth"] if smoothed else face["arousal"]
  dot = (int(round(cx + v * rad)), int(round(cy - a * rad)))
  cv2.circle(bgr, dot, max(2, rad // 5), colour, -1, cv2.LINE_AA)


def _copy_into(local: str, dest: epath.Path) -> None:
  """A local file streamed to ``dest`` under a temporary name, then renamed
  (``fileio.write_bytes``'s rule, without reading it whole)."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
  try:
    with open(local, "rb") as src, tmp.open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(dest)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


@contextlib.contextmanager
def _quiet_stderr():
  """File descriptor 2 sent to /dev/null for the block (C libraries' prints)."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "wb") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _open_writer(cv2, path_stem: str, rate: float, size):
  """(writer, path): VP8 in WebM, else MPEG-4 part 2 in mp4 (module doc)."""
  for fourcc, ext in (("VP80", ".webm"), ("mp4v", ".mp4")):
    path = path_stem + ext
    with _quiet_stderr():  # FFmpeg's misleading "tag VP80 is not supported
      # with codec id 139" (it then writes VP8 all the same); failure is
      # told by isOpened() below.
      writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), rate,
                               size)
    if writer.isOpened():
      if ext != ".webm":
        logging.warning("OpenCV cannot write VP8 WebM here; the annotated "
                        "copy is MPEG-4 part 2 in .mp4 (browsers do not "
                        "play it; VLC does)")
      return writer, path
  raise OSError(f"OpenCV cannot write a video of {size} (VP8 or MPEG-4)")


def write_annotated(video_path, log: tracks.TrackLog, out_file,
                    fps: float | None = None) -> epath.Path:
  """The sampled frames of ``video_path`` with each track's faces drawn.

  Decodes the video again with the same sampling (so frame indices match
  the log); written at the video's frame rate with each sampled frame held
  until the next one's timestamp (module docstring), VP8 in WebM, to a
  temporary name, then renamed. A frame that was unreadable is written
  black with that word on it. Returns the file written (``.mp4`` when the
  fallback was taken).
  """
  cv2 = video.cv2_module()
  out_file = epath.Path(out_file)
  # Per track, the index of its next face to draw: frames come in order.
  cursor = {tid: 0 for tid in log.tracks}
  with video.VideoReader(video_path, fps) as reader, \
      tempfile.TemporaryDirectory() as tmp:
    rate = reader.rate or fps or 25.0
    writer = path = start = None
    held, written = None, 0

    def hold_until(until: float) -> None:
      # The held frame fills the copy's frames up to ``until`` (seconds).
      nonlocal written
      end = int(round((until - start) * rate))
      while written < end:
        writer.write(held)
        written += 1

    try:
      for frame in reader:
        if frame.image is None:
          h, w = ((reader.height, reader.width) if held is None
                  else held.shape[:2])
          bgr = np.zeros((h, w, 3), np.uint8)
          cv2.putText(bgr, "unreadable", (8, h // 2),
                      cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        else:
          bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
        for tid, tr in log.tracks.items():
          i = cursor[tid]
          while i < len(tr) and tr.frame[i] < frame.index:
            i += 1
          while i < len(tr) and tr.frame[i] == frame.index:
            _draw_face(cv2, bgr, tid, tr.face(i), log.names)
            i += 1
          cursor[tid] = i
        if writer is None:
          start = frame.time
          writer, path = _open_writer(
              cv2, os.path.join(tmp, "annotated"), rate,
              (bgr.shape[1], bgr.shape[0]))
        else:
          hold_until(frame.time)
        held = bgr
      if held is not None:  # The last one: until the video's end.
        hold_until(max(reader.end_time, start + (written + 1) / rate))
    finally:
      if writer is not None:
        writer.release()
    if path is None:
      raise OSError(f"{video_path}: no frame to annotate")
    if not path.endswith(out_file.suffix):
      out_file = out_file.with_suffix(os.path.splitext(path)[1])
    _copy_into(path, out_file)
  logging.info("Wrote %s", out_file)
  return out_file
