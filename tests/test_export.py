"""`affectjax.export`: the jax_export artifact runs in plain JAX (no affectjax),
the ONNX one in ONNX Runtime (no jax), and both equal JAX within 1e-4.

One module for both formats: they share the session's tiny trained run,
which each xdist worker would otherwise train again."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from PIL import Image

from affectjax import scoring
from affectjax import export
from affectjax import export_onnx
from affectjax import workdir as workdir_lib
from tests import use_fixtures


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, synthetic_arrayrecord):
  return use_fixtures.trained_workdir(tmp_path_factory, synthetic_arrayrecord)


_CHILD = r"""
import json, sys
import numpy as np
from jax import export
exp = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
x = np.load(sys.argv[2])
logits, va = exp.call(x)
np.savez(sys.argv[3], logits=np.asarray(logits), va=np.asarray(va))
mods = [m for m in sys.modules if m.split(".")[0] in ("affectjax", "data_prep", "flax")]
print(json.dumps({"platforms": list(exp.platforms), "foreign_modules": mods}))
"""


def _child_env():
  # A clean CPU jax: one device, not the tests' 8 fake ones.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _call_exported(out, x, tmp_path):
  """Runs the artifact in ``out`` on ``x`` in a fresh process (_CHILD):
  (its outputs, what it reported)."""
  np.save(tmp_path / "x.npy", x)
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD, str(out / export.MODEL_FILE),
       str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
      capture_output=True, text=True, env=_child_env(), cwd=tmp_path,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return (np.load(tmp_path / "y.npz"),
          json.loads(proc.stdout.strip().splitlines()[-1]))


def _assert_matches_jax(run_dir, x, got, tta="none"):
  """The exported model's outputs ``got`` equal JAX's on ``x``, within 1e-4."""
  run = workdir_lib.open_run(run_dir, checkpoint="latest")
  logits, va = jax.jit(lambda x: scoring.predict_images(
      run.graphdef, run.weights(), x, image_size=run.config.image_size,
      tta=tta))(x)
  np.testing.assert_allclose(got["logits"], logits, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["va"], va, atol=1e-4, rtol=0)
  return logits, va


def test_exported_model_equals_jax_in_a_process_without_affectjax(
    run_dir, tmp_path):
  out = export.run_export(run_dir, checkpoint="latest",
                          output_dir=tmp_path / "export")
  sig = json.loads((out / "signature.json").read_text())
  s = sig["input_size"]
  assert sig["class_names"][7] == "contempt" and sig["source"]["step"] == 6
  assert "stablehlo" in (out / "model.stablehlo.mlir").read_text()[:2000]
  x = np.random.default_rng(0).integers(0, 256, (5, s, s, 3), dtype=np.uint8)
  got, info = _call_exported(out, x, tmp_path)
  assert info["foreign_modules"] == []
  assert set(info["platforms"]) == {"cpu", "cuda", "tpu"}
  logits, va = _assert_matches_jax(run_dir, x, got)
  assert got["logits"].shape == (5, 8) and np.ptp(got["logits"]) > 1e-3

  # The shipped runner works on an image file, standalone.
  Image.fromarray(x[0]).save(tmp_path / "face.png")
  proc = subprocess.run(
      [sys.executable, str(out / export.RUNNER), str(tmp_path / "face.png"),
       str(tmp_path / "missing.png")],
      capture_output=True, text=True, env=_child_env(), cwd=tmp_path,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines()]
  assert rows[0]["status"] == "ok" and rows[1]["status"] == "error"
  probs = np.exp(logits[0] - logits[0].max())
  np.testing.assert_allclose(rows[0]["probs"], probs / probs.sum(), atol=1e-4)


def test_exported_crops_tta_equals_jax_and_differs_from_plain(run_dir,
                                                              tmp_path):
  """--tta=crops is baked into the artifact: its ten views, as evaluate's."""
  out = export.run_export(run_dir, checkpoint="latest", tta="crops",
                          platforms=("cpu",), output_dir=tmp_path / "export")
  assert json.loads((out / "signature.json").read_text())["tta"] == "crops"
  s = json.loads((out / "signature.json").read_text())["input_size"]
  x = np.random.default_rng(1).integers(0, 256, (3, s, s, 3), dtype=np.uint8)
  got, _ = _call_exported(out, x, tmp_path)
  _assert_matches_jax(run_dir, x, got, tta="crops")
  with pytest.raises(AssertionError):  # Not the plain pass.
    _assert_matches_jax(run_dir, x, got, tta="none")


def test_unknown_format_names_the_flag(run_dir):
  with pytest.raises(ValueError, match="--format='tflite'"):
    export.run_export(run_dir, fmt="tflite")


# Runs in a fresh interpreter: onnxruntime directly, then the shipped runner
# (run_exported.py), and reports which modules got imported.
_ONNX_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
out_dir, x_path, y_path = sys.argv[1:4]
x = np.load(x_path)
s = ort.InferenceSession(out_dir + "/model.onnx",
                         providers=["CPUExecutionProvider"])
logits, va = s.run(None, {"images": x})
sys.path.insert(0, out_dir)
from run_exported import ExportedModel
m = ExportedModel(out_dir)
logits2, va2 = m(x[:2])
np.savez(y_path, logits=logits, va=va, logits2=logits2, va2=va2)
mods = sorted(m for m in sys.modules
              if m.split(".")[0] in ("jax", "jaxlib", "affectjax", "flax",
                                     "data_prep", "jax2onnx"))
print(json.dumps({"foreign_modules": mods,
                  "inputs": [[i.name, i.shape] for i in s.get_inputs()]}))
"""


@pytest.mark.slow
def test_onnx_model_equals_jax_in_a_process_without_jax(run_dir, tmp_path):
  out = export.run_export(run_dir, checkpoint="latest", fmt="onnx",
                          output_dir=tmp_path / "export")
  sig = json.loads((out / "signature.json").read_text())
  assert sig["format"].startswith("onnx") and sig["class_names"][7] == (
      "contempt")
  assert "MaxPool" not in sig["onnx_ops"]  # Rewritten (see export_onnx).
  assert not (out / export.MODEL_FILE).exists()
  s = sig["input_size"]
  x = np.random.default_rng(0).integers(0, 256, (5, s, s, 3), dtype=np.uint8)
  np.save(tmp_path / "x.npy", x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
      [sys.executable, "-c", _ONNX_CHILD, str(out), str(tmp_path / "x.npy"),
       str(tmp_path / "y.npz")],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["foreign_modules"] == []
  assert info["inputs"] == [["images", ["batch", s, s, 3]]]
  got = np.load(tmp_path / "y.npz")
  logits, va = _assert_matches_jax(run_dir, x, got)
  np.testing.assert_allclose(got["logits2"], logits[:2], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["va2"], va[:2], atol=1e-4, rtol=0)
  assert got["logits"].shape == (5, 8) and np.ptp(got["logits"]) > 1e-3

  # The shipped runner's command line, on an image file.
  Image.fromarray(x[0]).save(tmp_path / "face.png")
  proc = subprocess.run(
      [sys.executable, str(out / export.RUNNER), str(tmp_path / "face.png")],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(proc.stdout.splitlines()[0])
  probs = np.exp(logits[0] - logits[0].max())
  np.testing.assert_allclose(row["probs"], probs / probs.sum(), atol=1e-4)


def _ops_net(x):
  """The primitives the three model families lower to that need care: max
  pooling (SAME and VALID, overlapping windows), explicit spatial padding
  (EfficientNet), a depthwise strided conv, channel reversal (VGG's BGR),
  sigmoid, and the antialiased resize."""
  x = jax.image.resize(x.astype(jnp.float32), (x.shape[0], 12, 12, 3),
                       "bilinear", antialias=True) / 255.0
  x = x[..., ::-1]
  k = np.linspace(-1, 1, 3 * 3 * 1 * 3, dtype=np.float32).reshape(3, 3, 1, 3)
  x = jnp.pad(x, ((0, 0), (0, 1), (1, 1), (0, 0)))
  x = lax.conv_general_dilated(x, k, (2, 2), "VALID",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=3)
  x = jax.nn.sigmoid(x) * x
  a = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                        "SAME")
  b = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1),
                        "VALID")
  return a.reshape(a.shape[0], -1), b.mean(axis=(1, 2))


def _run_onnxruntime(model, images):
  """Runs an in-memory ModelProto on the CPU with ONNX Runtime."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  sess = ort.InferenceSession(model.SerializeToString(),
                              providers=["CPUExecutionProvider"])
  return tuple(sess.run(None, {export_onnx.INPUT_NAME: images}))

def test_rewritten_primitives_match_jax_with_any_batch():
  model = export_onnx.convert(_ops_net, input_size=20)
  ops = export_onnx.op_types(model)
  assert "MaxPool" not in ops and "Pad" not in ops
  for n in (1, 3):
    x = np.random.default_rng(n).integers(0, 256, (n, 20, 20, 3), np.uint8)
    want = jax.jit(_ops_net)(x)
    got = _run_onnxruntime(model, x)
    for g, w in zip(got, want):
      assert g.shape == w.shape
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)

