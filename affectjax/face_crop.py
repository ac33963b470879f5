"""The face crop: image bytes + face box + margin -> uint8 face at a fixed size.

data_prep stores faces with it and predict serves with it, so a photo and a
box give the same pixels in both (no train/serve skew). Dependencies run
one way: ``data_prep`` imports this module, never the reverse.

  crop_face(data, box, margin, size)   bytes -> Crop (the one crop path)
  crop_array(image, box, margin, size) an already decoded uint8 array -> Crop
  load_rgb(data)                       robust decode to uint8 RGB
  crop_box(box, margin, height, width) face box -> integer crop rectangle
  resize(image, size)                  antialiased bilinear to size x size

The crop path: the box is squared to its longer side and grown by
``margin`` on each side (``crop_box``); a plain JPEG is decoded at the
smallest DCT scale (1/8 steps, libjpeg-turbo through simplejpeg) that still
leaves the crop at least ``size`` pixels on each side (real AffectNet photos
are often 1000+ px while faces are stored at a few hundred); the crop is cut
from the decoded image and resized with antialiased bilinear filtering.

Decoding turns whatever AffectNet-like trees really contain into uint8 RGB:
grayscale, CMYK, palette, RGBA/LA (composited over black), 16-bit images
(scaled to 8 bit), PNG/GIF/BMP files with a .jpg name (the bytes are
sniffed, not the extension), and EXIF-rotated JPEGs (rotated upright).
Anything truncated or corrupt raises ``BadImage``.

Also here, shared by predict and data_prep: the image file extensions both
accept, and the column names of AffectNet's official CSVs.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

# Files both predict (directories of faces) and data_prep (image trees) take.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
# AffectNet's official training.csv / validation.csv columns, in order. The
# first five (path and face box) are what a boxes CSV for predict needs.
OFFICIAL_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
                    "face_height", "facial_landmarks", "expression", "valence",
                    "arousal")
BOX_COLUMNS = OFFICIAL_COLUMNS[:5]

# PIL's decompression-bomb guard, raised for real photos (AffectNet's largest
# are ~20 MP); anything bigger is reported as a corrupt image. PIL's
# LOAD_TRUNCATED_IMAGES stays False: a truncated file is a counted skip.
Image.MAX_IMAGE_PIXELS = 200_000_000

Box = tuple[float, float, float, float]  # (x, y, width, height) in pixels.


class BadImage(ValueError):
  """An unreadable image; ``reason`` is the skip-reason key to count it under."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Crop:
  """A cropped face and where it came from."""
  image: np.ndarray  # uint8 (size, size, 3) RGB.
  box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in source pixels.

  @property
  def source_shape(self) -> tuple[int, int]:
    """(height, width) of the crop in source pixels (before any resize)."""
    x0, y0, x1, y1 = self.box
    return y1 - y0, x1 - x0


def crop_face(data: bytes, box: Box | None, margin: float, size: int) -> Crop:
  """Image bytes -> the face in ``box`` grown by ``margin``, at size x size.

  ``box=None`` takes the whole image (no margin). Raises ``BadImage`` for
  empty, corrupt or truncated data and for a box outside the image.
  """
  crop = {}

  def min_size(h: int, w: int) -> tuple[int, int]:
    # Decode only as large as needed for the crop to keep >= size pixels.
    crop["box"] = _crop_rect(box, margin, h, w)
    x0, y0, x1, y1 = crop["box"]
    return (math.ceil(h * size / (y1 - y0)), math.ceil(w * size / (x1 - x0)))

  img, sy, sx = load_rgb(data, min_size=min_size)
  if "box" not in crop or (sy, sx) == (1.0, 1.0):
    # PIL path (or no downscale): crop on the decoded image's own size.
    min_size(round(img.shape[0] / sy), round(img.shape[1] / sx))
  return _cut(img, crop["box"], sy, sx, size)


def crop_array(image: np.ndarray, box: Box | None, margin: float,
               size: int) -> Crop:
  """``crop_face`` for an image that is already decoded (uint8 (H, W, 3))."""
  rect = _crop_rect(box, margin, image.shape[0], image.shape[1])
  return _cut(image, rect, 1.0, 1.0, size)


def _crop_rect(box: Box | None, margin: float, h: int, w: int
               ) -> tuple[int, int, int, int]:
  if box is None:
    return crop_box((0, 0, w, h), 0.0, h, w)
  return crop_box(box, margin, h, w)


def _cut(img: np.ndarray, rect: tuple[int, int, int, int], sy: float,
         sx: float, size: int) -> Crop:
  """Cuts the source-pixel ``rect`` from an image decoded at scale (sy, sx)."""
  x0, y0, x1, y1 = rect
  dx0, dy0 = int(math.floor(x0 * sx)), int(math.floor(y0 * sy))
  dx1 = max(dx0 + 1, min(img.shape[1], int(math.ceil(x1 * sx))))
  dy1 = max(dy0 + 1, min(img.shape[0], int(math.ceil(y1 * sy))))
  return Crop(image=resize(np.ascontiguousarray(img[dy0:dy1, dx0:dx1]), size),
              box=(x0, y0, x1, y1))


# --------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------
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


# --------------------------------------------------------------------------
# Geometry.
# --------------------------------------------------------------------------
def crop_box(box: Box, margin: float, height: int, width: int
             ) -> tuple[int, int, int, int]:
  """Face box (x, y, w, h) -> integer crop (x0, y0, x1, y1) in the image.

  The box is squared to its longer side, grown by ``margin`` (a fraction of
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
