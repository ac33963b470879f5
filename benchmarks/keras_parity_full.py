"""Full-resolution Keras parity: VGG16 at 224 px and EfficientNet-B3 at 300 px.

The unit tests (tests/test_keras_parity.py) check parity at 32 px; this
script checks the real input sizes, where every stride-2 padding decision is
exercised on the sizes used in training. For each model it builds
`keras.applications.<Model>(include_top=False)` on the JAX backend, gets
weights, converts them with `affectjax.models.load_imagenet_weights`, and
compares feature maps on the same uint8 images (ours: model.preprocess +
model.features; Keras: its own preprocessing + model). Exit status 1 if any
relative error exceeds --rtol.

  # Random weights (offline; every weight incl. BN statistics randomized):
  KERAS_BACKEND=jax .venv/bin/python benchmarks/keras_parity_full.py

  # Random weights written in another Keras generation's file naming
  # (keras1 = the official VGG16 file's, tf_keras2 = EfficientNet's, keras3_h5, keras3):
  KERAS_BACKEND=jax .venv/bin/python benchmarks/keras_parity_full.py --naming=keras1

  # The official ImageNet files (downloaded, or taken from --weights_dir):
  KERAS_BACKEND=jax .venv/bin/python benchmarks/keras_parity_full.py \
      --weights=imagenet --weights_dir=~/.cache/affectjax/weights

On 2 CPU cores it takes ~2-4 minutes (mostly XLA compiles). On GPU, float32
convolutions may run in TF32; the script pins 'highest' matmul precision so
the comparison is of the ports, not of TF32 rounding.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from affectjax import models  # pylint: disable=g-import-not-at-top
from affectjax.models import keras_reference  # pylint: disable=g-import-not-at-top

SIZES = {"vgg16": 224, "efficientnet_b3": 300}


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
  """Face-like smooth uint8 images (low-frequency blobs + noise), not pure noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.zeros((n, size, size, 3))
  for i in range(n):
    for c in range(3):
      fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6.3)]
      out[i, :, :, c] = 128 + 90 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
  out += rng.normal(0, 12, out.shape)
  return np.clip(out, 0, 255).astype(np.uint8)


def check(name: str, size: int, batch: int, weights: str, weights_dir: str,
          workdir: str, naming: str = "tf_keras2") -> tuple[float, float]:
  t0 = time.time()
  if weights == "imagenet":
    path = models.imagenet_weights_path(name, weights_dir)
    keras_model = keras_reference.build(name, size, imagenet_graph=True, weights_path=path)
  else:
    keras_model = keras_reference.build(name, size, imagenet_graph=True)
    keras_reference.randomize(keras_model, seed=0)
    suffix = ".weights.h5" if naming == "keras3" else ".h5"
    path = os.path.join(workdir, f"{name}_random_notop_{naming}{suffix}")
    keras_reference.write_weights(keras_model, path, naming)
    # Load through Keras' own loader: checks the file, and refreshes
    # the Normalization layer's cached mean/variance (Keras reads them from
    # its variables only when weights are loaded).
    keras_model.load_weights(path)
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  models.load_imagenet_weights(model, path)
  images = smooth_images(batch, size, seed=1)
  ours = nnx.jit(lambda b, x: b.intermediates(b.preprocess(x)))(model.backbone, images)
  ref = keras_reference.tap_outputs(
      keras_model, ours, keras_reference.keras_preprocess(name, images), batch)
  errors = keras_reference.compare_taps(ours, ref)
  worst = max(errors, key=lambda k: max(errors[k]))
  rel_l2, rel_max = errors[worst]
  last = list(ours)[-1]
  label = weights if weights == "imagenet" else f"{weights} ({naming} file)"
  print(f"{name:16s} {size}px batch {batch} weights={label}: {len(errors)} layer "
        f"outputs compared, features {tuple(ours[last].shape)}; worst {worst}: "
        f"rel L2 {rel_l2:.2e}, rel max {rel_max:.2e}; features: rel L2 "
        f"{errors[last][0]:.2e} ({time.time() - t0:.0f} s on "
        f"{jax.devices()[0].platform})", flush=True)
  return rel_l2, rel_max


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="vgg16,efficientnet_b3")
  parser.add_argument("--weights", choices=("random", "imagenet"), default="random")
  parser.add_argument("--weights_dir", default="~/.cache/affectjax/weights")
  parser.add_argument("--naming", choices=keras_reference.NAMINGS, default="tf_keras2",
                      help="file naming of the random-weight file (Keras generation)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=0, help="override 224/300 px")
  parser.add_argument("--rtol", type=float, default=1e-4)
  parser.add_argument("--precision", default="highest",
                      help="jax_default_matmul_precision (TF32 on GPU is not parity)")
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", args.precision)
  failed = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.models.split(","):
      errors = check(name, args.size or SIZES[name], args.batch, args.weights,
                     args.weights_dir, workdir, args.naming)
      if max(errors) > args.rtol:
        failed.append(name)
  if failed:
    print(f"FAILED (relative error > {args.rtol}): {', '.join(failed)}")
    return 1
  print(f"OK: all relative errors <= {args.rtol}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
