r"""Export a trained model as a serving artifact that needs neither affectjax
nor a GPU build of jax.

  python -m affectjax.export --workdir=runs/demo [--checkpoint=best|latest|STEP]
      [--format=jax_export|onnx] [--output_dir=WORKDIR/export/<checkpoint>]
      [--platforms=cpu,cuda,tpu]

Format ``jax_export`` (the default): the
model as a serialized ``jax.export.Exported`` (StableHLO plus calling
convention, weights baked in as constants), lowered for every platform in
``--platforms``, batch size symbolic. It runs with a plain ``pip install jax
flatbuffers`` (the CPU wheel on any machine; the same file runs on CUDA or
TPU builds), through ``jax.export.deserialize(bytes).call(images)``. The
output directory holds:

  model.jaxexport      the serialized Exported;
  model.stablehlo.mlir the StableHLO module as text (IREE, XLA tools, review);
  signature.json       input/output shapes and dtypes, class names, the
                       input size and how to make inputs, provenance;
  run_exported.py      a standalone runner (jax, numpy, Pillow): images in,
                       JSON lines out.

Format ``onnx``: the same function as an ONNX model (``model.onnx``, opset
21, batch size symbolic, weights inside) that ONNX Runtime runs without jax
(``pip install onnxruntime numpy pillow``), converted by jax2onnx (the
``onnx`` extra; see affectjax/export_onnx.py). The directory holds
model.onnx, signature.json and the same run_exported.py, which then runs it
with onnxruntime. TFLite is not offered: docs/USING.md says why.

Input: uint8 face crops (N, S, S, 3) RGB, S = the size data_prep stored faces
at (crop the face box with data_prep's margin, resize to S x S bilinear;
both from the run's ``run_contract.json``, never from the data dir);
the model's own resize to ``config.image_size`` and its normalization are
inside the artifact. Outputs: ``logits`` float32 (N, C) and
``valence_arousal`` float32 (N, 2) in [-1, 1].
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath

from affectjax import cli
from affectjax import fileio
from affectjax import scoring
from affectjax import workdir as workdir_lib

FORMATS = ("jax_export", "onnx")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
MODEL_FILE = "model.jaxexport"
RUNNER = "run_exported.py"


def serving_fn(graphdef, weights: dict, *, image_size: int, tta: str = "none"):
  """uint8 (N, S, S, 3) -> (logits, valence_arousal); weights as constants."""
  host = jax.tree.map(np.asarray, jax.device_get(weights))

  def serve(images):
    return scoring.predict_images(graphdef, host, images,
                                     image_size=image_size, tta=tta)
  return serve


def export_model(graphdef, weights: dict, *, input_size: int, image_size: int,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 tta: str = "none") -> jax.export.Exported:
  """``jax.export`` of the serving function with a symbolic batch size."""
  fn = serving_fn(graphdef, weights, image_size=image_size, tta=tta)
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, input_size, input_size, 3), jnp.uint8)
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)


def write_artifact(exported: jax.export.Exported, output_dir, *,
                   signature: dict) -> epath.Path:
  """Writes the jax_export files (each under a temporary name, renamed)."""
  return write_files(output_dir, {
      MODEL_FILE: bytes(exported.serialize()),
      "model.stablehlo.mlir": exported.mlir_module().encode()},
                     signature=signature)


def write_files(output_dir, files: dict[str, bytes], *,
                signature: dict) -> epath.Path:
  """Writes `files`, signature.json and the runner (each under a temporary
  name, then renamed)."""
  out = epath.Path(output_dir)
  for name, data in files.items():
    fileio.write_bytes(out / name, data)
  fileio.write_json(out / "signature.json", signature)
  runner = epath.Path(__file__).parent / "export_runner.py"
  fileio.write_text(out / RUNNER, runner.read_text())
  return out


def run_export(workdir, *, checkpoint: str = "best", fmt: str = "jax_export",
               output_dir=None, platforms: Sequence[str] = DEFAULT_PLATFORMS,
               tta: str = "none", use_ema: bool = True) -> epath.Path:
  """Opens the run at ``checkpoint`` and writes the artifact; returns its dir."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: supported formats are {FORMATS} (see "
                     "docs/USING.md, 'Export').")
  run = workdir_lib.open_run(workdir, checkpoint=checkpoint)
  # The run's own input contract: the same artifact wherever the run is.
  contract = run.contract
  input_size = contract.prepared_size
  names = list(contract.class_names)
  signature = {
      "inputs": [{"name": "images", "dtype": "uint8",
                  "shape": ["batch", input_size, input_size, 3],
                  "layout": "NHWC, RGB, 0..255"}],
      "outputs": [{"name": "logits", "dtype": "float32",
                   "shape": ["batch", len(names)]},
                  {"name": "valence_arousal", "dtype": "float32",
                   "shape": ["batch", 2], "range": [-1, 1]}],
      "class_names": names,
      "input_size": input_size,
      "model_image_size": contract.model_size,
      "preprocessing": (
          f"Crop the face box grown by {contract.margin:g} of its longer "
          "side on each side (squared; data_prep's --margin for the run's "
          "data), resize to input_size x input_size with bilinear "
          "(antialiased) filtering, RGB uint8 (affectjax.face_crop does "
          "exactly this). The model's resize and normalization are inside "
          "the artifact."),
      "crop_margin": contract.margin,
      "normalization": contract.normalization,
      "tta": tta,
      "source": {"workdir": str(run.workdir), "step": run.step,
                 "checkpoint": run.label, "model": run.config.model.name,
                 "ema": bool(use_ema and "ema" in run.state),
                 "jax_version": jax.__version__},
  }
  out = epath.Path(output_dir) if output_dir else (
      run.workdir / "export" / run.label)
  if fmt == "onnx":
    from affectjax import export_onnx  # pylint: disable=g-import-not-at-top
    model = export_onnx.convert(
        serving_fn(run.graphdef, run.weights(use_ema),
                   image_size=contract.model_size, tta=tta),
        input_size=input_size)
    signature.update({
        "format": f"onnx, opset {export_onnx.OPSET}",
        "platforms": ["onnxruntime"],
        "onnx_ops": export_onnx.op_types(model),
        "usage": ("import onnxruntime as ort; s = ort.InferenceSession("
                  "'model.onnx'); logits, va = s.run(None, {'images': "
                  "images})")})
    signature["source"]["jax2onnx_version"] = export_onnx.converter_version()
    write_files(out, {export_onnx.MODEL_FILE: model.SerializeToString()},
                signature=signature)
  else:
    exported = export_model(run.graphdef, run.weights(use_ema),
                            input_size=input_size,
                            image_size=contract.model_size,
                            platforms=platforms, tta=tta)
    signature.update({
        "format": "jax.export (StableHLO), serialization version "
                  f"{exported.calling_convention_version}",
        "platforms": list(exported.platforms),
        "usage": ("from jax import export; exp = export.deserialize(open("
                  "'model.jaxexport','rb').read()); logits, va = "
                  "exp.call(images)")})
    write_artifact(exported, out, signature=signature)
  logging.info("Exported step %d to %s (%s)", run.step, out, fmt)
  return out


# --------------------------------------------------------------------------
# Command line (flags defined in `run()`, not at import).
# --------------------------------------------------------------------------
def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best, latest, or a step.")
  flags.DEFINE_enum("format", "jax_export", FORMATS, "Artifact format.")
  flags.DEFINE_string("output_dir", None,
                      "Default: WORKDIR/export/<checkpoint>.")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Platforms the jax_export artifact is lowered for (an "
                    "ONNX model runs wherever ONNX Runtime does).")
  flags.DEFINE_enum("tta", "none", scoring.TTA_MODES,
                    "flip: bake mirror averaging into the artifact; crops: "
                    "the ten views of scoring.tta_views.")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when present.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  out = run_export(f.workdir, checkpoint=f.checkpoint, fmt=f.format,
                   output_dir=f.output_dir, platforms=f.platforms, tta=f.tta,
                   use_ema=f.use_ema)
  model = ("model.onnx" if f.format == "onnx" else
           f"{MODEL_FILE}, model.stablehlo.mlir")
  print(f"Wrote {out}/ ({model}, signature.json, {RUNNER})", flush=True)


def run() -> None:
  _define_flags()
  app.run(cli.tool(main, "affectjax.export"), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
