r"""Where XLA:CPU spends a conv layer's train step: forward, input gradient, filter gradient.

For each 3x3 'same' conv of the custom CNN (NHWC activations, HWIO kernel)
this times, as separate jitted programs on one fixed batch:

  fwd   y = conv(x, w)
  dx    the input gradient (what `jax.vjp` of the conv emits, i.e. XLA's own
        backward-input convolution), and the alternatives below
  dw    the filter gradient (XLA's backward-filter convolution) and the
        alternatives below

Formulations compared (all numerically equal to `lax.conv_general_dilated`):

  xla        lax.conv_general_dilated and its autodiff
  flip       dx as a forward conv of dy with the spatially flipped,
             in/out-swapped kernel
  taps       dw as a sum over the 9 kernel taps of x_shifted^T @ dy (9 dots,
             no 9x patch matrix); dx likewise over taps of dy
  im2col     dw as patches^T @ dy with the patches built from 9 shifted
             slices of the padded input (one (N*H*W, 9*Cin) matrix)
  patches    dw as lax.conv_general_dilated_patches(x)^T @ dy
  chunkK     dw as XLA's filter gradient summed over chunks of K images (the
             trainer's fallback in `layers.conv_cpu_filter_grad`; --chunks=8,16)
  flat       dw with x zero-padded and flattened over (image, row, column):
             each tap is then one contiguous row offset, x[off:off+M]^T @ dy
             on dy padded alike (no strided slices, 9 dots)
  native     dw by the trainer's native kernel
             (`affectjax.models.native_kernels`, an XLA FFI call)

  .venv/bin/python benchmarks/conv_probe.py --image_size=48 --batch_size=64
  # with PyTorch's (oneDNN) fwd/dx/dw of the same layers beside them:
  .venv-bench/bin/python benchmarks/conv_probe.py --torch --only=fwd/xla,dx/xla,dw/xla,dw/chunk8

Runs under the trainer's XLA setting (Eigen convolutions, `affectjax.xla_cpu`)
and malloc settings (`import affectjax`); `--ynn` keeps XLA's default
YNNPACK convolutions (the setting of the numbers in BENCHMARKS.md before
"Eigen convolutions").

`--depthwise` instead compares, for some of EfficientNet-B3's depthwise
convolutions (112 px, batch --batch_size), lax's grouped convolution with
`affectjax.models.depthwise`'s shifted multiply-adds (its gradients are the
native kernels' unless AFFECTJAX_NATIVE_KERNELS=0) and the native forward
kernel, and for some of its 1x1 convolutions lax's convolution with a
matrix product:

  .venv/bin/python benchmarks/conv_probe.py --depthwise --batch_size=32

Prints milliseconds per call (median of --repeats, each of --iters calls).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import affectjax  # noqa: F401,E402  (host_malloc, before XLA's threads start)
from affectjax import xla_cpu

if "--ynn" not in sys.argv:
  xla_cpu.configure()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax import lax  # pylint: disable=g-import-not-at-top,wrong-import-position

from affectjax.models import native_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

DN = ("NHWC", "HWIO", "NHWC")


def conv_xla(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def _shifts(x):
  """The 9 shifted (N, H, W, C) views of x zero-padded by 1: tap (i, j) -> x[h+i-1, w+j-1]."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def dw_taps(x, dy):
  n, h, w, c = x.shape
  d = dy.reshape(-1, dy.shape[-1])
  return jnp.stack([s.reshape(-1, c).T @ d for s in _shifts(x)]).reshape(
      3, 3, c, dy.shape[-1])


def dw_im2col(x, dy):
  c = x.shape[-1]
  p = jnp.stack(_shifts(x), axis=3).reshape(-1, 9 * c)
  return (p.T @ dy.reshape(-1, dy.shape[-1])).reshape(3, 3, c, dy.shape[-1])


def dw_patches(x, dy):
  c = x.shape[-1]
  p = lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME",
                                       dimension_numbers=DN)
  g = p.reshape(-1, c * 9).T @ dy.reshape(-1, dy.shape[-1])  # (c, kh, kw) order
  return g.reshape(c, 3, 3, -1).transpose(1, 2, 0, 3)


def dw_chunked(x, dy, *, images):
  dw = 0
  for s in range(0, x.shape[0], images):
    dw = dw + jax.vjp(lambda w, s=s: conv_xla(x[s:s + images], w),
                      jnp.zeros((3, 3, x.shape[-1], dy.shape[-1])))[1](
                          dy[s:s + images])[0]
  return dw


def dw_flat(x, dy):
  n, h, wd, c = x.shape
  row = wd + 2
  m = n * (h + 2) * row
  xf = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(m, c)
  xf = jnp.pad(xf, ((0, 2 * row + 2), (0, 0)))
  # dy on the padded grid: output (i, j) reads x from row i, column j on.
  d = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(m, -1)
  return jnp.stack([xf[i * row + j:i * row + j + m].T @ d
                    for i in range(3) for j in range(3)]).reshape(
                        3, 3, c, dy.shape[-1])


def dw_native(x, dy):
  return native_kernels.filter_grad(
      x, dy, (3, 3, x.shape[-1], dy.shape[-1]), (1, 1), "SAME")


def torch_layer_fns(x, w, dy):
  """PyTorch's (oneDNN) fwd, dx and dw of the same layer (NCHW copies)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
  wt = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous()
  dt = torch.tensor(np.asarray(dy)).permute(0, 3, 1, 2).contiguous()
  g = torch.nn.grad
  return {
      "fwd/torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
      "dx/torch": lambda: g.conv2d_input(xt.shape, wt, dt, padding=1),
      "dw/torch": lambda: g.conv2d_weight(xt, wt.shape, dt, padding=1),
  }


def _time_torch(fn, iters, repeats):
  fn()
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      fn()
    out.append((time.perf_counter() - t) / iters * 1e3)
  return statistics.median(out)


def dx_flip(dy, w):
  return lax.conv_general_dilated(dy, w[::-1, ::-1].swapaxes(2, 3), (1, 1),
                                  "SAME", dimension_numbers=DN)


def dx_taps(dy, w):
  # dx[h, w] = sum_ij dy[h - i + 1, w - j + 1] @ w[i, j]^T
  n, h, wd, o = dy.shape
  dyp = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = 0
  for i in range(3):
    for j in range(3):
      s = dyp[:, 2 - i:2 - i + h, 2 - j:2 - j + wd, :]
      out = out + s @ w[i, j].T
  return out


def dx_im2col(dy, w):
  o = dy.shape[-1]
  wf = w[::-1, ::-1].swapaxes(2, 3)  # (3, 3, O, I)
  p = jnp.stack(_shifts(dy), axis=3).reshape(*dy.shape[:3], 9 * o)
  return p @ wf.reshape(9 * o, -1)


def fwd_im2col(x, w):
  c = x.shape[-1]
  p = jnp.stack(_shifts(x), axis=3).reshape(*x.shape[:3], 9 * c)
  return p @ w.reshape(9 * c, -1)


def _time(f, args, iters, repeats):
  jax.block_until_ready(f(*args))
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      r = f(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / iters * 1e3)
  return statistics.median(out)


# EfficientNet-B3 at 112 px, batch 32: (size, channels, kernel, stride) of
# some depthwise convs, (size, in, out) of some 1x1 convs.
DEPTHWISE_SHAPES = ((56, 144, 3, 1), (56, 144, 3, 2), (28, 192, 5, 1),
                    (14, 288, 5, 2), (7, 816, 5, 1))
POINTWISE_SHAPES = ((56, 24, 144), (56, 144, 24), (28, 192, 32), (7, 136, 816))


def depthwise_main(args):
  """--depthwise: lax's grouped conv vs affectjax.models.depthwise, and 1x1
  convs as lax convs vs matrix products (fwd, dx, dw; ms per call)."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from affectjax.models import depthwise  # pylint: disable=g-import-not-at-top
  n = args.batch_size
  key = jax.random.PRNGKey(0)

  def three(fn, x, w):
    """(fwd, dx, dw) jitted, and their results for the equality check."""
    y = fn(x, w)
    dy = jax.random.normal(key, y.shape)
    fs = (jax.jit(fn),
          jax.jit(lambda x, w, dy: jax.vjp(lambda x: fn(x, w), x)[1](dy)[0]),
          jax.jit(lambda x, w, dy: jax.vjp(lambda w: fn(x, w), w)[1](dy)[0]))
    return fs, ((x, w), (x, w, dy), (x, w, dy))

  def row(label, variants):
    out, ref = [], None
    for name, fn, x, w in variants:
      fs, argss = three(fn, x, w)
      res = [f(*a) for f, a in zip(fs, argss)]
      if ref is None:
        ref = res
      for a, b in zip(res, ref):
        err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
        assert err < 1e-4, (label, name, err)
      if not args.check:
        ms = [_time(f, a, args.iters, args.repeats) for f, a in zip(fs, argss)]
        out.append(f"{name}: fwd {ms[0]:.1f} dx {ms[1]:.1f} dw {ms[2]:.1f}")
    print(f"{label:28s} " + " | ".join(out), flush=True)

  for size, c, k, stride in DEPTHWISE_SHAPES:
    x = jax.random.normal(key, (n, size, size, c))
    w = jax.random.normal(key, (k, k, 1, c)) * 0.1
    kw = dict(dimension_numbers=DN, feature_group_count=c)
    row(f"depthwise {size}px {c}ch {k}x{k}/{stride}", [
        ("lax", lambda x, w: lax.conv_general_dilated(x, w, (stride,) * 2, "SAME", **kw), x, w),
        ("taps", lambda x, w: depthwise.conv_general_dilated(x, w, (stride,) * 2, "SAME", **kw), x, w)])
    if native_kernels.available() and not args.check:
      # The training forward (the custom_vjp's rule); the rows above time
      # the primal, XLA's taps, and (kernels on) the native gradients.
      pads = lax.padtype_to_pads((size, size), (k, k), (stride, stride), "SAME")
      shape = depthwise.conv_general_dilated(x, w, (stride,) * 2, "SAME", **kw).shape
      fwd = jax.jit(lambda x, w: native_kernels.depthwise_conv(
          x, w, (stride, stride), pads, shape))
      print(f"{'':28s} native fwd {_time(fwd, (x, w), args.iters, args.repeats):.1f}",
            flush=True)
  for size, ci, co in POINTWISE_SHAPES:
    x = jax.random.normal(key, (n, size, size, ci))
    w = jax.random.normal(key, (1, 1, ci, co)) * 0.1
    row(f"1x1 {size}px {ci}->{co}", [
        ("lax", lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN), x, w),
        ("dot", lambda x, w: depthwise.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN), x, w)])
  if args.check:
    print("all formulations equal within 1e-4 relative")


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=48)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--widths", default="32,64,128,256")
  p.add_argument("--convs_per_stage", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--check", action="store_true", help="Check equality only.")
  p.add_argument("--chunks", default="8",
                 help="Images per chunk of the dw/chunkK rows.")
  p.add_argument("--only", default="",
                 help="Comma-separated columns to time (default: all).")
  p.add_argument("--torch", action="store_true",
                 help="Also time PyTorch's fwd/dx/dw (run from .venv-bench).")
  p.add_argument("--ynn", action="store_true",
                 help="XLA's default YNNPACK convolutions instead of Eigen's.")
  p.add_argument("--depthwise", action="store_true",
                 help="EfficientNet-B3's depthwise and 1x1 convs (112 px "
                      "shapes; use --batch_size=32) instead of the custom "
                      "CNN's 3x3 convs.")
  args = p.parse_args()
  if args.depthwise:
    return depthwise_main(args)
  widths = [int(v) for v in args.widths.split(",")]
  shapes, cin, s = [], 3, args.image_size
  for i, wd in enumerate(widths):
    if i:
      s //= 2
    for _ in range(args.convs_per_stage):
      shapes.append((s, cin, wd))
      cin = wd
  key = jax.random.PRNGKey(0)
  dx_xla = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv_xla(x, w), x)[1](dy)[0])
  dw_xla = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv_xla(x, w), w)[1](dy)[0])
  cands = {
      "fwd/xla": (jax.jit(conv_xla), "xw"),
      "fwd/im2col": (jax.jit(fwd_im2col), "xw"),
      "dx/xla": (dx_xla, "xwd"),
      "dx/flip": (jax.jit(dx_flip), "dw"),
      "dx/taps": (jax.jit(dx_taps), "dw"),
      "dx/im2col": (jax.jit(dx_im2col), "dw"),
      "dw/xla": (dw_xla, "xwd"),
      "dw/taps": (jax.jit(dw_taps), "xd"),
      "dw/im2col": (jax.jit(dw_im2col), "xd"),
      "dw/patches": (jax.jit(dw_patches), "xd"),
      "dw/flat": (jax.jit(dw_flat), "xd"),
  }
  if native_kernels.available():
    cands["dw/native"] = (jax.jit(dw_native), "xd")
  else:
    print(f"# dw/native: off ({native_kernels.unavailable_reason()})")
  for k in (int(v) for v in args.chunks.split(",") if v):
    cands[f"dw/chunk{k}"] = (
        jax.jit(functools.partial(dw_chunked, images=k)), "xd")
  if args.only:
    cands = {k: v for k, v in cands.items() if k in args.only.split(",")}
  names = list(cands) + (["fwd/torch", "dx/torch", "dw/torch"]
                         if args.torch else [])
  totals = {k: 0.0 for k in names}
  print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; batch {args.batch_size}, "
        f"{args.image_size} px; ms per call, median of {args.repeats}")
  print(f"{'layer':>18s} " + " ".join(f"{k:>10s}" for k in names))
  for (s, ci, co) in shapes:
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, s * 1000 + co), 3)
    x = jax.random.normal(k1, (args.batch_size, s, s, ci))
    w = jax.random.normal(k2, (3, 3, ci, co)) * 0.1
    dy = jax.random.normal(k3, (args.batch_size, s, s, co))
    env = {"x": x, "w": w, "d": dy}
    ref = {"fwd": conv_xla(x, w), "dx": dx_xla(x, w, dy), "dw": dw_xla(x, w, dy)}
    row = []
    for name, (f, sig) in cands.items():
      a = [env[c] for c in sig]
      r = f(*a)
      err = float(jnp.max(jnp.abs(r - ref[name.split("/")[0]])) /
                  (jnp.max(jnp.abs(ref[name.split("/")[0]])) + 1e-12))
      assert err < 1e-4, (name, s, ci, co, err)
      if args.check:
        continue
      ms = _time(f, a, args.iters, args.repeats)
      totals[name] += ms
      row.append(ms)
    if args.torch and not args.check:
      for name, fn in torch_layer_fns(x, w, dy).items():
        ms = _time_torch(fn, args.iters, args.repeats)
        totals[name] += ms
        row.append(ms)
    if not args.check:
      print(f"{s:3d}px {ci:4d}->{co:4d}    " + " ".join(f"{v:10.2f}" for v in row),
            flush=True)
  if not args.check:
    print(f"{'total ms':>18s} " + " ".join(f"{v:10.2f}" for v in totals.values()))
  else:
    print("all formulations equal within 1e-4 relative")


if __name__ == "__main__":
  main()
