"""Robust image loading, face cropping and encoding for data_prep.

Loading turns whatever AffectNet-like trees really contain into uint8 RGB:
grayscale, CMYK, palette, RGBA/LA (composited over black), 16-bit images
(scaled to 8 bit), PNG/GIF/BMP files with a .jpg name (the bytes are sniffed,
not the extension), and EXIF-rotated JPEGs (rotated upright). Plain JPEGs take
the fast path: simplejpeg (libjpeg-turbo) in strict mode, decoding at a
reduced DCT scale when the face box is much larger than the output (real
AffectNet photos are often 1000+ px while the output is ~112 px). Anything
truncated or corrupt raises `BadImage`, which the caller counts and skips.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

# PIL's decompression-bomb guard, raised for real photos (AffectNet's largest
# are ~20 MP); anything bigger is reported as a corrupt image. PIL's
# LOAD_TRUNCATED_IMAGES stays False: a truncated file is a counted skip.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(ValueError):
  """An unreadable image; `reason` is the skip-reason key to count it under."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def _needs_rotation(data: bytes) -> bool:
  """True if a JPEG's EXIF orientation tag asks for a rotation or flip."""
  # Most files have no Exif APP1 segment (it sits in the first 64 KB); only
  # those that do pay for PIL's lazy header parse (no pixel decode).
  if b"Exif\x00\x00" not in data[:65536]:
    return False
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.getexif().get(0x0112, 1) not in (0, 1)
  except (OSError, ValueError, SyntaxError):
    return False  # Unreadable EXIF: decode as stored.


def load_rgb(data: bytes, *,
             min_size: Callable[[int, int], tuple[int, int]] | None = None
             ) -> tuple[np.ndarray, float, float]:
  """Decodes image bytes to uint8 (H, W, 3) RGB.

  Args:
    data: the file's bytes.
    min_size: optional function (height, width) of the stored image ->
      (min_height, min_width) the decoded image must keep; lets the JPEG
      decoder downscale by a factor M/8 (DCT scaling) while staying at least
      that big.

  Returns:
    (image, sy, sx): the decoded image and the factors that map original
    pixel coordinates to decoded ones (1.0 unless the decoder downscaled).

  Raises:
    BadImage: empty, truncated or corrupt data.
  """
  if not data:
    raise BadImage("empty_file", "file has 0 bytes")
  if data[:2] == b"\xff\xd8" and not _needs_rotation(data):
    try:
      import simplejpeg  # pylint: disable=g-import-not-at-top
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
      mh, mw = min_size(h, w) if min_size else (0, 0)
      img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=mh,
                                   min_width=mw)
      return img, img.shape[0] / h, img.shape[1] / w
    except BadImage:
      raise  # From min_size: e.g. a face box outside the image.
    except ValueError:
      pass  # CMYK/odd JPEGs, or corrupt: let PIL decide (and report) below.
  return _load_with_pil(data), 1.0, 1.0


def _load_with_pil(data: bytes) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Forces a full decode: truncation raises here.
      im = ImageOps.exif_transpose(im)
      return _to_rgb(im)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadImage("corrupt_image", f"cannot decode image: {e}") from e


def _to_rgb(im: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 RGB array."""
  mode = im.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(im).astype(np.int64)
    # 16-bit data -> 8 bit by the top byte; 32-bit 'I' written from 16-bit
    # sources is clipped to the 16-bit range first.
    a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2)
  if mode == "F":
    a = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2)
  if mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.mode == "RGBA":
    rgba = im.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
  return np.asarray(im.convert("RGB"))


def crop_box(box: tuple[float, float, float, float], margin: float,
             height: int, width: int) -> tuple[int, int, int, int]:
  """Face box (x, y, w, h) -> integer crop (x0, y0, x1, y1) in the image.

  The box is squared to its longer side, grown by `margin` (a fraction of
  that side, on each side), then clipped to the image. Clipping can make
  the crop non-square at image borders; the resize then stretches slightly,
  which beats padding with invented pixels.
  """
  x, y, w, h = box
  side = max(w, h) * (1.0 + 2.0 * margin)
  cx, cy = x + w / 2.0, y + h / 2.0
  x0 = max(0, int(math.floor(cx - side / 2)))
  y0 = max(0, int(math.floor(cy - side / 2)))
  x1 = min(width, int(math.ceil(cx + side / 2)))
  y1 = min(height, int(math.ceil(cy + side / 2)))
  if x1 - x0 < 2 or y1 - y0 < 2:
    raise BadImage("bad_face_box",
                   f"face box {box} lies outside the {width}x{height} image")
  return x0, y0, x1, y1


def resize(img: np.ndarray, size: int) -> np.ndarray:
  """Area-aware (antialiased bilinear) resize to size x size."""
  if img.shape[0] == size and img.shape[1] == size:
    return np.ascontiguousarray(img)
  return np.asarray(Image.fromarray(img).resize(
      (size, size), Image.Resampling.BILINEAR))


def encode(img: np.ndarray, encoding: str, quality: int) -> bytes:
  """uint8 RGB -> stored bytes (JPEG, 4:4:4 chroma, or raw pixels)."""
  if encoding == "jpeg":
    import simplejpeg  # pylint: disable=g-import-not-at-top
    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality,
                                  colorspace="RGB", colorsubsampling="444")
  if encoding == "raw":
    return np.ascontiguousarray(img, np.uint8).tobytes()
  raise ValueError(f"--encoding must be 'jpeg' or 'raw', got {encoding!r}.")
