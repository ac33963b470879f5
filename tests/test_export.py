"""`affectjax.export`: the artifact runs in plain JAX (no affectjax) and equals JAX."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from affectjax import scoring
from affectjax import export
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


def test_exported_model_equals_jax_in_a_process_without_affectjax(
    run_dir, tmp_path):
  out = export.run_export(run_dir, checkpoint="latest",
                          output_dir=tmp_path / "export")
  sig = json.loads((out / "signature.json").read_text())
  s = sig["input_size"]
  assert sig["class_names"][7] == "contempt" and sig["source"]["step"] == 6
  assert "stablehlo" in (out / "model.stablehlo.mlir").read_text()[:2000]
  x = np.random.default_rng(0).integers(0, 256, (5, s, s, 3), dtype=np.uint8)
  np.save(tmp_path / "x.npy", x)
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD, str(out / export.MODEL_FILE),
       str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
      capture_output=True, text=True, env=_child_env(), cwd=tmp_path,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["foreign_modules"] == []
  assert set(info["platforms"]) == {"cpu", "cuda", "tpu"}
  got = np.load(tmp_path / "y.npz")
  run = workdir_lib.open_run(run_dir, checkpoint="latest")
  logits, va = jax.jit(lambda x: scoring.predict_images(
      run.graphdef, run.weights(), x, image_size=run.config.image_size))(x)
  np.testing.assert_allclose(got["logits"], logits, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["va"], va, atol=1e-4, rtol=0)
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


def test_unknown_format_names_the_flag(run_dir):
  with pytest.raises(ValueError, match="--format='tflite'"):
    export.run_export(run_dir, fmt="tflite")
