"""Videos for the video tests and benchmarks/video_bench.py, written with
OpenCV (the library affectjax decodes with) from data_prep's synthetic faces.

A clip is a list of frames: drawn faces (``synthetic.render_face``, clean:
no occluders, so only the expression changes between two renders of one
seed) pasted on a flat green canvas. ``find_patches`` is a detector for
such frames: the boxes of what is not canvas, so the test knows each box
exactly (OpenCV's cascade finds only some drawn faces; it is tested on its
own).
"""
from __future__ import annotations

import dataclasses

import numpy as np

CANVAS = (0, 255, 0)  # Pure green: no drawn face has a pixel of it.


def face(expression: int, seed: int, size: int) -> np.ndarray:
  """A clean synthetic face of ``expression`` (uint8 size x size x 3).

  The same seed gives the same person, background and pose for every
  expression (only the mouth, eyes and brows change).
  """
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, 7])
  va = synthetic.VA_MEAN_STD[expression]
  img, _, _ = synthetic.render_face(expression, va[0], va[2], rng,
                                    image_size=size, occlude=False)
  return img


@dataclasses.dataclass
class Placed:
  """One face in one frame: which face and where (x, y of its top left)."""
  image: np.ndarray
  x: int
  y: int

  @property
  def box(self) -> tuple[int, int, int, int]:
    return (self.x, self.y, self.image.shape[1], self.image.shape[0])


def compose(width: int, height: int, placed: list[Placed]) -> np.ndarray:
  frame = np.empty((height, width, 3), np.uint8)
  frame[:] = CANVAS
  for p in placed:
    h, w = p.image.shape[:2]
    frame[p.y:p.y + h, p.x:p.x + w] = p.image
  return frame


def find_patches(rgb: np.ndarray, min_side: int = 8, tol: int = 0
                 ) -> list[tuple]:
  """Boxes (x, y, w, h) of the regions farther than ``tol`` from the canvas
  colour (0 for lossless frames; JPEG frames ring around edges), largest
  first."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  diff = np.abs(rgb.astype(np.int16) - np.asarray(CANVAS, np.int16))
  mask = diff.max(axis=2) > tol
  labels, _ = ndimage.label(mask)
  boxes = []
  for sl in ndimage.find_objects(labels):
    y, x = sl[0].start, sl[1].start
    h, w = sl[0].stop - y, sl[1].stop - x
    if min(w, h) >= min_side:
      boxes.append((x, y, w, h))
  return sorted(boxes, key=lambda b: -b[2] * b[3])


def write(path, frames: list[np.ndarray], fps: float = 10.0,
          fourcc: str = "FFV1") -> None:
  """RGB frames -> a video file (FFV1 is lossless; MJPG is one JPEG a frame)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = frames[0].shape[:2]
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps,
                           (w, h))
  assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
  for f in frames:
    writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  writer.release()


def decode(path) -> list[np.ndarray]:
  """Every frame of ``path`` as RGB, read back with OpenCV."""
  import cv2  # pylint: disable=g-import-not-at-top
  cap = cv2.VideoCapture(str(path))
  out = []
  while True:
    ok, bgr = cap.read()
    if not ok:
      break
    out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
  cap.release()
  return out


def corrupt_jpeg_frame(path, frame: int) -> None:
  """Zeroes frame ``frame``'s JPEG in an MJPG file but its first two bytes
  (the decoder then finds no JPEG data in that frame; the frames around it
  still decode). Not the last frame."""
  data = bytearray(open(path, "rb").read())
  starts = [i for i in range(len(data) - 2)
            if data[i:i + 3] == b"\xff\xd8\xff"]
  s, e = starts[frame] + 2, starts[frame + 1]  # Keep its start-of-image mark.
  data[s:e - 16] = bytes(e - 16 - s)
  with open(path, "wb") as f:
    f.write(bytes(data))


def write_two_face_clip(path, num_frames: int = 150, width: int = 640,
                        height: int = 360, fps: float = 25.0) -> None:
  """The benchmark's clip: two drawn faces drifting across the frame, their
  expressions changing every second (FFV1 in .mkv). Seeds 3 and 6: people
  OpenCV's cascade finds (it misses some drawn faces)."""
  side = height // 3
  faces = {(e, s): face(e, s, side) for e in range(8) for s in (3, 6)}
  frames = []
  for i in range(num_frames):
    e1, e2 = (i // int(fps)) % 8, (i // int(fps) + 3) % 8
    drift = (width / 2 - side) * i / max(1, num_frames)
    frames.append(compose(width, height, [
        Placed(faces[e1, 3], int(side // 4 + drift), height // 6),
        Placed(faces[e2, 6], int(width - side - side // 4 - drift),
               height // 2)]))
  write(path, frames, fps=fps)


def set_rotation(path, degrees: int) -> None:
  """Gives an mp4's video track a display matrix that rotates it by
  ``degrees`` (90, 180, 270) clockwise, as a phone's portrait video has:
  the 'tkhd' box's matrix, patched in place (no FFmpeg needed)."""
  import struct  # pylint: disable=g-import-not-at-top
  one = 1 << 16
  cos, sin = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]
  data = bytearray(open(path, "rb").read())
  i = data.find(b"tkhd")
  assert i > 0, f"{path} has no tkhd box"
  version = data[i + 4]
  # version+flags, then times and ids (v0: 20 bytes, v1: 32), reserved (8),
  # layer, group, volume, reserved (8): then the 3x3 matrix.
  off = i + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
  data[off:off + 36] = struct.pack(">9i", cos * one, sin * one, 0,
                                   -sin * one, cos * one, 0, 0, 0, 1 << 30)
  with open(path, "wb") as f:
    f.write(bytes(data))


def set_mkv_duration(path, seconds: float) -> None:
  """Overwrites a Matroska file's announced Duration (milliseconds at the
  default timecode scale): OpenCV's frame count is then an estimate from it,
  longer than the real stream, like files whose muxer wrote a rounded-up or
  wrong duration."""
  import struct  # pylint: disable=g-import-not-at-top
  data = bytearray(open(path, "rb").read())
  i = data.find(b"\x44\x89")
  assert i > 0, f"{path} has no Duration element"
  size = data[i + 2]
  if size == 0x88:
    data[i + 3:i + 11] = struct.pack(">d", seconds * 1000.0)
  elif size == 0x84:
    data[i + 3:i + 7] = struct.pack(">f", seconds * 1000.0)
  else:
    raise AssertionError(f"unexpected Duration size byte {size:#x}")
  with open(path, "wb") as f:
    f.write(bytes(data))
