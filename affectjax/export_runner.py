"""Runs an affectjax export without affectjax: plain JAX (or ONNX Runtime),
numpy and Pillow.

Copied next to every export as run_exported.py. Install the runtime with
`pip install jax flatbuffers numpy pillow` for a jax_export artifact (CPU is
enough; a CUDA or TPU build of jax runs the same file on that accelerator),
or `pip install onnxruntime numpy pillow` for an ONNX one (model.onnx; jax is
then never imported), then:

  python run_exported.py face1.jpg face2.png ...   # JSON lines on stdout

or from Python:

  from run_exported import ExportedModel
  model = ExportedModel("path/to/export")
  logits, va = model(images_uint8)        # (N, S, S, 3) -> (N, C), (N, 2)

Inputs are face crops; `load_face` resizes a crop to the model's input size
the way data_prep does (Pillow bilinear, antialiased when shrinking). Crop a
whole photo to its face box first (grown by data_prep's margin).
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np


class ExportedModel:
  """The exported model: call with uint8 (N, S, S, 3); returns numpy arrays."""

  def __init__(self, directory):
    directory = pathlib.Path(directory)
    self.signature = json.loads((directory / "signature.json").read_text())
    if (directory / "model.onnx").exists():
      import onnxruntime as ort  # pylint: disable=g-import-not-at-top
      session = ort.InferenceSession(str(directory / "model.onnx"),
                                     providers=["CPUExecutionProvider"])
      self._call = lambda x: session.run(None, {"images": x})
    else:
      from jax import export  # pylint: disable=g-import-not-at-top
      exported = export.deserialize(
          bytearray((directory / "model.jaxexport").read_bytes()))
      self._call = exported.call
    self.input_size = int(self.signature["input_size"])
    self.class_names = list(self.signature["class_names"])

  def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    want = (self.input_size, self.input_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f"images must be uint8 (N, {want[0]}, {want[1]}, 3), "
                       f"got {images.dtype} {images.shape}")
    logits, va = self._call(images)
    return np.asarray(logits), np.asarray(va)


def load_face(path, size: int) -> np.ndarray:
  """A face-crop image file -> uint8 (size, size, 3) RGB."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im).convert("RGB")
    if im.size != (size, size):
      im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, np.uint8)


def main(argv) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  model = ExportedModel(pathlib.Path(__file__).resolve().parent)
  for path in argv[1:]:
    try:
      face = load_face(path, model.input_size)
    except OSError as e:
      print(json.dumps({"path": path, "status": "error", "error": str(e)}))
      continue
    logits, va = model(face[None])
    z = np.exp(logits[0] - logits[0].max())
    probs = z / z.sum()
    c = int(probs.argmax())
    print(json.dumps({"path": path, "status": "ok", "class": c,
                      "name": model.class_names[c],
                      "probs": [round(float(p), 6) for p in probs],
                      "valence": float(va[0, 0]), "arousal": float(va[0, 1])}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
