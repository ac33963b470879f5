r"""Training-step throughput: affectjax vs PyTorch vs Keras, same model, same run.

Each framework runs in its own subprocess (so thread pools and allocators
don't interfere), repeated and reported as a median:

  step   model compute only: one fixed uint8 batch already in memory, full
         train step. Frameworks: affectjax (`jax.jit` over the nnx.split
         state -- the real `affectjax.train` step, which also runs the
         device augmentation: random resized crop, flip), affectjax with
         `nnx.jit` (normalize, forward, loss, backward, AdamW: no
         augmentation), PyTorch (eager; torch.compile is not used: it needs a
         C++ toolchain warm-up longer than the run), Keras 3 on TensorFlow
         (`train_on_batch`, `jit_compile="auto"`, Keras 3's default: XLA
         where the model allows it).

The peers' steps do not augment, so `step/affectjax` against them is not
like for like (`step/affectjax_nnx_jit` is closer); docs/BENCHMARKS.md
therefore carries no table from this script.

The input pipeline has its own benchmark, `benchmarks/input_bench.py`.

The custom CNN is mirrored exactly in each framework: stages of
2 x [conv3x3 (no bias) -> BatchNorm -> ReLU], 2x2 max-pool between stages,
global average pooling, Dense(256)-ReLU, then 8 logits and 2 tanh outputs.

  .venv-bench/bin/python benchmarks/train_bench.py --data_dir=runs/demo/data/arrayrecord

needs the `bench` extra (`pip install -e '.[bench]'`: tensorflow-cpu, torch).
Prints the medians and ratios; nothing is recorded in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (32, 64, 128)
HIDDEN = 256


# ----------------------------------------------------------------------------
# Model-step workers (run in subprocesses).
# ----------------------------------------------------------------------------
def _batch(args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n, s = args.batch_size, args.image_size
  return (rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
          rng.integers(0, 8, (n,)).astype(np.int32),
          rng.uniform(-1, 1, (n, 2)).astype(np.float32))


def step_affectjax(args, use_nnx_jit=False):
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from affectjax import losses, sharding, train, train_state  # pylint: disable=g-import-not-at-top
  from configs import custom_cnn  # pylint: disable=g-import-not-at-top
  c = custom_cnn.get_config()
  c.model.kwargs.widths = WIDTHS
  c.model.kwargs.dropout = 0.0
  c.image_size, c.batch_size = args.image_size, args.batch_size
  c.optimizer.grad_clip_norm = 0.0
  images, labels, va = _batch(args)
  mesh = sharding.make_mesh(jax.devices()[:1])
  batch = sharding.shard_batch({"image": images, "expression": labels,
                                "valence": va[:, 0], "arousal": va[:, 1]}, mesh)
  if not use_nnx_jit:
    graphdef, state, tx = train_state.init_state(c, mesh)
    train_fn, _ = train.make_steps(graphdef, tx, c, mesh)

    def run(n):
      nonlocal state
      for _ in range(n):
        state, m = train_fn(state, batch, train_backbone=True)
      jax.block_until_ready(m["loss"])
  else:
    model = train_state.build_model(c)
    opt = nnx.Optimizer(model, optax.adamw(c.optimizer.learning_rate),
                        wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt, batch):
      def loss_fn(model):
        x = model.preprocess(batch["image"])
        logits, v = model(x, train=True)
        return losses.multitask_loss(
            logits, v, expression=batch["expression"],
            valence=batch["valence"], arousal=batch["arousal"])[0]
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      opt.update(model, grads)
      return loss

    def run(n):
      for _ in range(n):
        loss = nnx_step(model, opt, batch)
      jax.block_until_ready(loss)
  return run


def step_torch(args):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  layers, cin = [], 3
  for i, w in enumerate(WIDTHS):
    if i:
      layers.append(nn.MaxPool2d(2))
    for _ in range(2):
      layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False),
                 nn.BatchNorm2d(w, eps=1e-3, momentum=0.01), nn.ReLU()]
      cin = w
  backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(cin, HIDDEN), nn.ReLU())
  expr, va_head = nn.Linear(HIDDEN, 8), nn.Linear(HIDDEN, 2)
  params = [*backbone.parameters(), *expr.parameters(), *va_head.parameters()]
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
  images, labels, va = _batch(args)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
  x_u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y, t = torch.from_numpy(labels).long(), torch.from_numpy(va)

  def run(n):
    for _ in range(n):
      x = (x_u8.float() - mean) / std
      h = backbone(x)
      loss = (nn.functional.cross_entropy(expr(h), y)
              + ((torch.tanh(va_head(h)) - t) ** 2).mean(0).sum())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    float(loss)
  return run


def step_keras(args):
  os.environ["KERAS_BACKEND"] = "tensorflow"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers as L  # pylint: disable=g-import-not-at-top
  inp = keras.Input((args.image_size, args.image_size, 3))
  x = L.Normalization(mean=[123.675, 116.28, 103.53],
                      variance=[58.395**2, 57.12**2, 57.375**2])(inp)
  for i, w in enumerate(WIDTHS):
    if i:
      x = L.MaxPooling2D(2)(x)
    for _ in range(2):
      x = L.Conv2D(w, 3, padding="same", use_bias=False)(x)
      x = L.BatchNormalization()(x)
      x = L.ReLU()(x)
  x = L.GlobalAveragePooling2D()(x)
  x = L.Dense(HIDDEN, activation="relu")(x)
  model = keras.Model(inp, [L.Dense(8, name="expr")(x),
                            L.Dense(2, activation="tanh", name="va")(x)])
  model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
                loss=[keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), "mse"])
  images, labels, va = _batch(args)
  x_in = images.astype("float32")

  def run(n):
    for _ in range(n):
      model.train_on_batch(x_in, [labels, va])
  return run


# ----------------------------------------------------------------------------
# Input-pipeline workers.
# ----------------------------------------------------------------------------
WORKERS = {
    "step/affectjax": lambda a: step_affectjax(a),
    "step/affectjax_nnx_jit": lambda a: step_affectjax(a, use_nnx_jit=True),
    "step/torch": step_torch,
    "step/keras_tf": step_keras,
}


def _worker(args):
  run = WORKERS[args.worker](args)
  run(args.warmup)
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    run(args.steps)
    times.append(time.perf_counter() - t)
  print(json.dumps({"worker": args.worker, "seconds": times}))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default="runs/demo/data/arrayrecord",
                 help="Prepared dataset (python -m data_prep.affectnet output).")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--steps", type=int, default=20, help="Steps per repeat.")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", default="", help="Comma-separated worker names.")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return _worker(args)

  names = [n for n in WORKERS if not args.only or n in args.only.split(",")]
  results = {}
  for name in names:
    cmd = [sys.executable, __file__, f"--worker={name}"] + [
        f"--{k}={v}" for k, v in vars(args).items()
        if k not in ("worker", "only")]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=REPO)
    if out.returncode:
      print(f"{name}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
      continue
    secs = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    med = statistics.median(secs)
    results[name] = args.steps * args.batch_size / med
    print(f"{name:28s} median {results[name]:8.1f} img/s "
          f"(runs: {', '.join(f'{args.steps * args.batch_size / s:.0f}' for s in secs)})",
          flush=True)
  ours = "step/affectjax"
  if ours in results:
    for name, rate in results.items():
      if name != ours:
        print(f"ratio {ours} / {name}: {results[ours] / rate:.2f}x")


if __name__ == "__main__":
  main()
