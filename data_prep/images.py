"""Encoding stored faces: uint8 RGB -> the bytes a record holds.

Decoding, face boxes and the crop itself live in ``affectjax.face_crop``,
shared with ``affectjax.predict`` so serving crops exactly like preparation.
"""
from __future__ import annotations

import numpy as np


def encode(img: np.ndarray, encoding: str, quality: int) -> bytes:
  """uint8 RGB -> stored bytes (JPEG, 4:4:4 chroma, or raw pixels)."""
  if encoding == "jpeg":
    import simplejpeg  # pylint: disable=g-import-not-at-top
    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality,
                                  colorspace="RGB", colorsubsampling="444")
  if encoding == "raw":
    return np.ascontiguousarray(img, np.uint8).tobytes()
  raise ValueError(f"--encoding must be 'jpeg' or 'raw', got {encoding!r}.")
