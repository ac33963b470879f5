r"""Training-step throughput: affectjax vs PyTorch vs Keras-TF, same model, interleaved.

`--model` picks the backbone, the same in every framework:

  custom_cnn       affectjax/models/custom_cnn.py, mirrored layer for layer:
                   stages of `--convs_per_stage` x [conv3x3 (no bias) ->
                   BatchNorm (eps 1e-3) -> ReLU], a 2x2 max-pool between
                   stages (`--widths`);
  vgg16            affectjax's VGG16, `keras.applications.VGG16` and
                   `torchvision.models.vgg16` (`include_top=False` /
                   `.features`: 13 convs, 5 pools), random weights;
  efficientnet_b3  affectjax's EfficientNet-B3, `keras.applications.
                   EfficientNetB3` and `torchvision.models.efficientnet_b3`
                   (`.features`, up to the 1536-channel top conv), random
                   weights, stochastic depth 0.2 in all three.

Then global average pooling, Dense(256)-ReLU, 8 logits and 2 tanh outputs;
loss = cross-entropy + MSE(tanh), AdamW. Every step starts from the same
fixed uint8 batch in memory (normalization inside the step: ImageNet
mean/std, or 'caffe' mean subtraction for VGG16) and nothing is augmented
in any framework, so the rows are like for like.

Workers (each its own subprocess, so thread pools and allocators don't
interfere):

  jax_<impl>   affectjax: `jax.jit` (donated) of normalize, forward, loss,
               backward and optax AdamW over the `nnx.split` state -- the
               trainer's step without its device augmentation -- for each
               model `impl` in --jax_impls ('fused', 'plain', 'auto'; see
               docs/MODELS.md); `<impl>:bfloat16` computes in bfloat16
               (config.model.dtype).
  jax_train    the real `affectjax.train` step (`train.make_steps`), which
               also runs the device augmentation (random resized crop,
               flip): not like for like, shown for what a run costs.
               `jax_train:N` splits the CPU into N JAX devices as the
               trainer's --config.cpu_devices does (default: --cpu_devices).

Every jax row runs with the trainer's XLA flags (affectjax/xla_cpu.py:
Eigen convolutions) and malloc settings (affectjax/host_malloc.py); `@<set>`
after a row's name (`fused@ynn`, `jax_train:2@ynn`) adds an XLA_FLAG_SETS
entry below (`ynn`: XLA's YNNPACK default; `nomalloc`: glibc's default
malloc settings; `nonative`: XLA's filter gradients instead of the native
kernel, affectjax/models/native_kernels.py).
  torch        PyTorch eager (torch.compile needs a C++ toolchain warm-up
               longer than the run), NCHW, all cores (--threads).
  keras        Keras 3 on TensorFlow, `train_on_batch`, `jit_compile="auto"`
               (Keras 3's default: XLA where the model allows).

All workers start, compile and warm up first (one at a time); then the
repeats are interleaved round-robin (jax, torch, keras, jax, torch, keras,
...), one worker running at a time, so that a change in the machine's load
hits every framework alike. Each repeat is `--steps` steps; the script
prints every worker's median img/s (and its runs), its median CPU time per
image (process time, all threads: a fairer figure when other jobs share the
cores; the kernel's share in brackets), its minor page faults per step,
the ratios to torch and keras, and the load average before and after.

  python3 -m venv .venv-bench
  .venv-bench/bin/pip install torch==2.13.0 torchvision==0.28.0 \
      && .venv-bench/bin/pip install -e '.[bench]'
  .venv-bench/bin/python benchmarks/train_bench.py --image_size=48 \
      --widths=32,64,128,256 --batch_size=64
  .venv-bench/bin/python benchmarks/train_bench.py --model=efficientnet_b3 \
      --image_size=112 --batch_size=32 --steps=2

(`torch==2.13.0` and its torchvision first: the CPU wheel; the `bench`
extra's plain `torch` would otherwise pull a CUDA build.)
`benchmarks/step_profile.py` explains the jax numbers op by op;
docs/BENCHMARKS.md records both.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = 256
# Stochastic depth of EfficientNet-B3 in all three (Keras' and torchvision's default).
DROP_CONNECT = 0.2
NUM_CLASSES = 8


def _batch(args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n, s = args.batch_size, args.image_size
  return (rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
          rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32),
          rng.uniform(-1, 1, (n, 2)).astype(np.float32))


def _widths(args):
  return tuple(int(w) for w in args.widths.split(","))


# ----------------------------------------------------------------------------
# Workers (run in subprocesses). Each returns run(n): n train steps, blocking.
# ----------------------------------------------------------------------------
# XLA:CPU flag sets a jax row can run under: `--jax_impls=fused@ynn`. Without
# one, jax rows run as the trainer does: Eigen convolutions
# (affectjax/xla_cpu.py).
XLA_FLAG_SETS = {
    # XLA's default: YNNPACK convolutions (the trainer's before xla_cpu.py).
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution",
    # oneDNN convolutions and matmuls (custom calls) instead of YNNPACK/Eigen.
    "onednn": "--xla_cpu_use_onednn=true "
              "--xla_cpu_experimental_onednn_custom_call=true",
    # Eigen convolutions, each op on one thread (for one device per core).
    "eigen1": "--xla_cpu_multi_thread_eigen=false",
    # No YNNPACK fusions at all (convolutions, dots, reductions: XLA's own).
    "noynn": "--xla_cpu_experimental_ynn_fusion_type=",
    # The trainer's XLA flags, but glibc's default malloc settings (not
    # affectjax/host_malloc.py's): XLA's buffers mapped afresh every step.
    "nomalloc": "",
    # The trainer's settings, but XLA's filter gradients (in chunks) instead
    # of the native kernel (affectjax/models/native_kernels.py).
    "nonative": "",
}


def _jax_spec(impl):
  """'fused' -> ('fused', 'float32'); 'fused:bfloat16@onednn' -> ('fused',
  'bfloat16') (the flag set is the driver's business)."""
  impl, _, dtype = impl.split("@")[0].partition(":")
  return impl, dtype or "float32"


def _jax_config(args, impl):
  """The `--model` config at the bench's size, its head and impl, no dropout."""
  sys.path.insert(0, REPO)
  import importlib  # pylint: disable=g-import-not-at-top
  impl, dtype = _jax_spec(impl)
  c = importlib.import_module(f"configs.{args.model}").get_config()
  if args.model == "custom_cnn":
    c.model.kwargs.widths = _widths(args)
    c.model.kwargs.convs_per_stage = args.convs_per_stage
  elif args.model == "efficientnet_b3":
    c.model.kwargs.drop_connect_rate = DROP_CONNECT
  c.model.kwargs.dropout = 0.0
  c.model.kwargs.head_hidden = HIDDEN
  c.model.kwargs.impl = impl
  c.model.dtype = dtype
  c.model.init = "scratch"  # Random weights, as the peers'.
  c.transfer.mode = "full"
  c.num_classes = NUM_CLASSES
  c.image_size, c.batch_size = args.image_size, args.batch_size
  c.optimizer.grad_clip_norm = 0.0
  c.loss.class_weighting = "none"
  return c


def make_jax_step(args, impl):
  """(jitted step, [params, rest, opt_state], batch): the trainer's computation
  without augmentation, `jax.jit` over the `nnx.split` state, donated."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  c = _jax_config(args, impl)
  from affectjax import losses, train_state  # pylint: disable=g-import-not-at-top
  model = train_state.build_model(c)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  opt_state = tx.init(params)
  images, labels, va = _batch(args)
  batch = jax.device_put({"image": images, "expression": labels,
                          "valence": va[:, 0], "arousal": va[:, 1]})

  def train_step(params, rest, opt_state, batch):
    key = jax.random.key(0)  # EfficientNet's drop-connect.
    def loss_fn(params):  # As affectjax.train.train_step's.
      m = nnx.merge(graphdef, params, rest, copy=True)
      logits, v = m(m.preprocess(batch["image"]), train=True,
                    rngs=nnx.Rngs(dropout=key))
      loss = losses.multitask_loss(
          logits, v, expression=batch["expression"],
          valence=batch["valence"], arousal=batch["arousal"])[0]
      return loss, nnx.split(m, nnx.Param, ...)[2]
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1, 2))
  return step, [params, rest, opt_state], batch


def step_jax(args, impl):
  """See `make_jax_step`."""
  import jax  # pylint: disable=g-import-not-at-top
  step, state, batch = make_jax_step(args, impl)

  def run(n):
    for _ in range(n):
      *state[:], loss = step(*state, batch)
    jax.block_until_ready(loss)
  return run


def step_jax_train(args, devices=None):
  """The real trainer step (`train.make_steps`): with the device augmentation.

  `devices`: the row's CPU device count (`jax_train:N`), else --cpu_devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  c = _jax_config(args, "auto")
  from affectjax import cpu_devices, sharding, train, train_state  # pylint: disable=g-import-not-at-top
  # The trainer's CPU split (--cpu_devices, as --config.cpu_devices).
  c.cpu_devices = args.cpu_devices if devices is None else devices
  cpu_devices.configure(c)
  images, labels, va = _batch(args)
  mesh = sharding.make_mesh()
  batch = sharding.shard_batch({"image": images, "expression": labels,
                                "valence": va[:, 0], "arousal": va[:, 1]}, mesh)
  graphdef, state, tx = train_state.init_state(c, mesh)
  train_fn, _ = train.make_steps(graphdef, tx, c, mesh)
  holder = [state]

  def run(n):
    for _ in range(n):
      holder[0], m = train_fn(holder[0], batch, train_backbone=True)
    jax.block_until_ready(m["loss"])
  return run


def _torch_backbone(args):
  """(backbone module ending in ReLU(Dense 256), its output width) for --model."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  if args.model == "custom_cnn":
    layers, cin = [], 3
    for i, w in enumerate(_widths(args)):
      if i:
        layers.append(nn.MaxPool2d(2))
      for _ in range(args.convs_per_stage):
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False),
                   nn.BatchNorm2d(w, eps=1e-3, momentum=0.01), nn.ReLU()]
        cin = w
    features = nn.Sequential(*layers)
  else:
    models = _torchvision_models()
    if args.model == "vgg16":
      features, cin = models.vgg16(weights=None).features, 512
    else:
      net = models.efficientnet_b3(weights=None,
                                   stochastic_depth_prob=DROP_CONNECT)
      features, cin = net.features, 1536
  return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(cin, HIDDEN), nn.ReLU())


def _torchvision_models():
  """`torchvision.models`, even where torchvision's C ops fail to load.

  The registry's torchvision wheel can fail to load its compiled ops
  (`torchvision._C`, `torchvision::nms`) beside a torch +cpu build; the
  model definitions (pure `torch.nn`) need none of them. `import
  torchvision` registers its ops' fake kernels at import time, which is
  what fails, so on failure the ops' registration is skipped and the
  import retried.
  """
  try:
    import torchvision.models as models  # pylint: disable=g-import-not-at-top
    return models
  except (ImportError, RuntimeError, OSError) as e:
    print(f"torchvision import failed ({e!r}); retrying without its C ops",
          file=sys.stderr)
  for name in [m for m in sys.modules if m.startswith("torchvision")]:
    del sys.modules[name]
  import torch  # pylint: disable=g-import-not-at-top
  real = torch.library.register_fake
  torch.library.register_fake = lambda *a, **k: (lambda f: f)
  try:
    import torchvision.models as models  # pylint: disable=g-import-not-at-top
  finally:
    torch.library.register_fake = real
  return models


def step_torch(args):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads or os.cpu_count())
  backbone = _torch_backbone(args)
  backbone.train()
  expr, va_head = nn.Linear(HIDDEN, NUM_CLASSES), nn.Linear(HIDDEN, 2)
  params = [*backbone.parameters(), *expr.parameters(), *va_head.parameters()]
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
  images, labels, va = _batch(args)
  if args.model == "vgg16":  # Keras' 'caffe' preprocessing (as affectjax's).
    mean = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1)
    std = torch.ones(1, 3, 1, 1)
  else:
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


def _keras_features(args, inp):
  """The --model backbone on Keras input `inp` (float32, 0..255 RGB)."""
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers as L  # pylint: disable=g-import-not-at-top
  shape = (args.image_size, args.image_size, 3)
  if args.model == "efficientnet_b3":  # Normalization is inside the model.
    # drop_connect_rate: EfficientNetB3's own default, DROP_CONNECT (0.2).
    return keras.applications.EfficientNetB3(
        include_top=False, weights=None, input_shape=shape)(inp)
  if args.model == "vgg16":  # 'caffe': BGR, minus the means.
    x = L.Normalization(mean=[103.939, 116.779, 123.68], variance=[1, 1, 1])(
        inp[..., ::-1])
    return keras.applications.VGG16(include_top=False, weights=None,
                                    input_shape=shape)(x)
  x = L.Normalization(mean=[123.675, 116.28, 103.53],
                      variance=[58.395**2, 57.12**2, 57.375**2])(inp)
  for i, w in enumerate(_widths(args)):
    if i:
      x = L.MaxPooling2D(2)(x)
    for _ in range(args.convs_per_stage):
      x = L.Conv2D(w, 3, padding="same", use_bias=False)(x)
      x = L.BatchNormalization()(x)
      x = L.ReLU()(x)
  return x


def step_keras(args):
  os.environ["KERAS_BACKEND"] = "tensorflow"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.threads:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers as L  # pylint: disable=g-import-not-at-top
  inp = keras.Input((args.image_size, args.image_size, 3))
  x = L.GlobalAveragePooling2D()(_keras_features(args, inp))
  x = L.Dense(HIDDEN, activation="relu")(x)
  model = keras.Model(inp, [L.Dense(NUM_CLASSES, name="expr")(x),
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


def _make_worker(name, args):
  if name.startswith("jax_train"):  # jax_train[:N][@flags]
    n = name.split("@")[0].partition(":")[2]
    return step_jax_train(args, int(n) if n else None)
  if name.startswith("jax_"):
    return step_jax(args, name[len("jax_"):])
  return {"torch": step_torch,
          "keras": step_keras}[name](args)


def _worker(args):
  """Serves 'run' requests on stdin: each times --steps steps, prints JSON."""
  if args.worker.startswith("jax"):
    # Before jax starts any thread: the trainer's malloc settings
    # (affectjax/host_malloc.py), as `python -m affectjax.main` has them.
    sys.path.insert(0, REPO)
    import affectjax  # pylint: disable=g-import-not-at-top,unused-import
  run = _make_worker(args.worker, args)
  run(args.warmup)
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "run":
      break
    t, c = time.perf_counter(), time.process_time()
    r = resource.getrusage(resource.RUSAGE_SELF)
    run(args.steps)
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": time.perf_counter() - t,
                      "cpu": time.process_time() - c,
                      "sys": r2.ru_stime - r.ru_stime,
                      "faults": r2.ru_minflt - r.ru_minflt}), flush=True)


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------
def _cpu_model():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(l.split(":", 1)[1].strip() for l in out.splitlines()
                if l.startswith("Model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="custom_cnn",
                 choices=("custom_cnn", "vgg16", "efficientnet_b3"),
                 help="Backbone in every framework: the custom CNN (--widths, "
                      "--convs_per_stage), or VGG16 / EfficientNet-B3 "
                      "(keras.applications, torchvision.models, random "
                      "weights).")
  p.add_argument("--image_size", type=int, default=48)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--widths", default="32,64,128,256",
                 help="Comma-separated stage widths of the custom CNN.")
  p.add_argument("--convs_per_stage", type=int, default=2)
  p.add_argument("--jax_impls", default="fused,plain",
                 help="The model's impls to time (config.model.kwargs.impl), "
                      "one jax_<impl> worker each; 'impl:bfloat16' computes "
                      "in bfloat16 (config.model.dtype); 'impl@ynn' / "
                      "'impl@onednn' runs under that XLA_FLAG_SETS entry.")
  p.add_argument("--cpu_devices", type=int, default=1,
                 help="JAX CPU devices of the jax_train row, as the trainer's "
                 "--config.cpu_devices (1: one, the trainer's default; 0: one per "
                 "core, automatic).")
  p.add_argument("--threads", type=int, default=0,
                 help="Intra-op threads of torch and keras (0: all cores). "
                      "jax rows use XLA:CPU's own pool (all cores).")
  p.add_argument("--frameworks", default="jax,torch,keras",
                 help="Subset of jax (the --jax_impls rows), jax_train "
                      "(also jax_train:N for N CPU devices, and @flagset as "
                      "in --jax_impls, e.g. jax_train:2@ynn), "
                      "torch, keras.")
  p.add_argument("--steps", type=int, default=10, help="Steps per repeat.")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=5,
                 help="Interleaved rounds; each worker runs once per round.")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return _worker(args)

  names = []
  for f in args.frameworks.split(","):
    if f == "jax":
      names += [f"jax_{i}" for i in args.jax_impls.split(",")]
    elif f in ("torch", "keras") or f.startswith("jax_train"):
      names.append(f)
    else:
      p.error(f"--frameworks: unknown {f!r}; use jax, jax_train, torch, keras.")
  model = (f"custom CNN widths {args.widths} x{args.convs_per_stage}"
           if args.model == "custom_cnn" else args.model)
  print(f"# {_cpu_model()}, {os.cpu_count()} cores; {model}; image "
        f"{args.image_size} px, batch {args.batch_size}; "
        f"{args.repeats} rounds of {args.steps} steps; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  workers = {}
  for name in names:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}"] + [
        f"--{k}={v}" for k, v in vars(args).items() if k != "worker"]
    err = tempfile.TemporaryFile(mode="w+")
    flags = name.partition("@")[2]
    if flags and flags not in XLA_FLAG_SETS:
      p.error(f"--jax_impls: unknown flag set @{flags}; use one of "
              f"{', '.join(XLA_FLAG_SETS)}.")
    wenv = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " "
                                + XLA_FLAG_SETS[flags]).strip()) if flags else env
    if name.startswith("jax"):  # TF's XLA would refuse XLA:CPU's new flags.
      sys.path.insert(0, REPO)
      from affectjax import host_malloc, xla_cpu  # pylint: disable=g-import-not-at-top
      wenv = dict(wenv)
      xla_cpu.configure(wenv)
      if flags == "nomalloc":  # The worker's `import affectjax` then skips it.
        wenv[host_malloc.OPT_OUT] = "default"
      if flags == "nonative":
        from affectjax.models import native_kernels  # pylint: disable=g-import-not-at-top
        wenv[native_kernels.OPT_OUT] = "0"
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, env=wenv, cwd=REPO)
    if proc.stdout.readline().strip() != "ready":
      proc.wait()
      err.seek(0)
      print(f"{name}: FAILED to start\n{err.read()[-3000:]}", file=sys.stderr)
      continue
    workers[name] = (proc, err)
  runs = {n: [] for n in workers}
  for _ in range(args.repeats):
    for name, (proc, err) in list(workers.items()):
      try:
        proc.stdin.write("run\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
      except BrokenPipeError:  # The worker died (the OOM killer, say).
        line = ""
      if not line:
        err.seek(0)
        status = proc.wait()
        print(f"{name}: FAILED (exit status {status}"
              f"{', killed by the OOM killer?' if status == -9 else ''})\n"
              f"{err.read()[-3000:]}", file=sys.stderr)
        del workers[name]
        continue
      runs[name].append(json.loads(line))
  for proc, _ in workers.values():
    proc.stdin.close()
    proc.wait()
  imgs = args.steps * args.batch_size
  rate, cpu_ms = {}, {}
  for name, rs in runs.items():
    if not rs:
      continue
    rate[name] = imgs / statistics.median(r["wall"] for r in rs)
    cpu_ms[name] = statistics.median(r["cpu"] for r in rs) / imgs * 1e3
    each = ", ".join(f"{imgs / r['wall']:.0f}" for r in rs)
    faults = statistics.median(r["faults"] for r in rs) / args.steps
    sys_ms = statistics.median(r["sys"] for r in rs) / imgs * 1e3
    print(f"{name:12s} median {rate[name]:8.1f} img/s (runs: {each}); "
          f"CPU {cpu_ms[name]:.2f} ms/img (kernel {sys_ms:.2f}); "
          f"{faults:.0f} page faults/step", flush=True)
  for ours in (n for n in rate if n.startswith("jax")):
    for peer in ("torch", "keras"):
      if peer in rate:
        print(f"ratio {ours} / {peer}: {rate[ours] / rate[peer]:.2f}x img/s, "
              f"{cpu_ms[peer] / cpu_ms[ours]:.2f}x by CPU time")
  print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
