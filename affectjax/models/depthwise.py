"""Depthwise and 1x1 convolutions in forms XLA:CPU runs fast (EfficientNet impl='fused').

Depthwise 2D convolution as shifted multiply-adds, with its gradients in
the same form; 1x1 convolutions as matrix products (`pointwise_conv`).

A depthwise convolution (`feature_group_count` = channels, one k x k filter
per channel) does k*k multiply-adds per output value. XLA:CPU runs it, and
worse its two gradients, as grouped convolutions it handles poorly: its
filter gradient becomes a *dense* channels x channels convolution whose
diagonal is kept (C times the work), and the forward and input-gradient
convolutions run far below the machine's speed (docs/BENCHMARKS.md,
EfficientNet-B3 profile: together at least 70% of the train step).

`depthwise_conv` computes the same convolution as k*k shifted, strided slices
of the padded input, each multiplied by one filter tap (a per-channel
vector) and summed; XLA fuses them into one elementwise loop over the
output. Its `custom_vjp` does the same for the gradients:

  input gradient   each tap's dy * w[i, j] placed back where the tap read
                   (a strided, zero-interior `lax.pad`), summed: one loop;
  filter gradient  for each tap, the sum over batch and positions of the
                   tap's input slice times dy: k*k reductions, accumulated
                   in float32.

In training (the `custom_vjp`'s rules) on the CPU, native kernels
(`native_kernels`) compute the forward pass, the filter gradient and the
stride-1 input gradient, reading the arrays in place instead of a padded
copy and k*k slices.

Values and gradients equal lax's within float rounding (a different
summation order). `conv_general_dilated` is a drop-in for
`lax.conv_general_dilated` (what `nnx.Conv` calls) that takes this path for
depthwise NHWC/HWIO convolutions without dilation and lax's otherwise.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from affectjax.models import native_kernels

_NHWC = (0, 3, 1, 2)  # ConvDimensionNumbers.lhs_spec / out_spec of NHWC.
_HWIO = (3, 2, 0, 1)  # rhs_spec of HWIO.


def _tap(xp, i, j, out_h, out_w, strides):
  """xp[:, i + s*h, j + s*w, :] for h < out_h, w < out_w."""
  sh, sw = strides
  n, _, _, c = xp.shape
  return lax.slice(xp, (0, i, j, 0),
                   (n, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c),
                   (1, sh, sw, 1))


def _out_size(padded, k, s):
  return (padded - k) // s + 1


def _padded(x, padding):
  """x zero-padded as one array of its own (negative padding crops).

  The barrier keeps XLA from fusing the pad (and what produced x) into each
  of the k*k tap slices: fused, every tap became an array of its own,
  written and read once more; materialized once, each tap is a plain
  strided read inside one multiply-add loop.
  """
  zero = jnp.zeros((), x.dtype)
  return lax.optimization_barrier(lax.pad(
      x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, w, strides, padding):
  """Depthwise conv of NHWC `x` with HWIO `w` of shape (kh, kw, 1, C).

  `strides` is (sh, sw); `padding` ((top, bottom), (left, right)) explicit
  zero padding, as `lax.padtype_to_pads` gives for 'SAME'. Equal to
  `lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=
  ('NHWC', 'HWIO', 'NHWC'), feature_group_count=C)`.
  """
  return _forward(x, w, strides, padding)


@jax.named_scope("depthwise_fwd")  # Names the ops for step_profile.py.
def _forward(x, w, strides, padding):
  kh, kw = w.shape[0], w.shape[1]
  xp = _padded(x, padding)
  oh = _out_size(xp.shape[1], kh, strides[0])
  ow = _out_size(xp.shape[2], kw, strides[1])
  w = w.astype(x.dtype)
  y = None
  for i in range(kh):
    for j in range(kw):
      t = _tap(xp, i, j, oh, ow, strides) * w[i, j, 0]
      y = t if y is None else y + t
  return y


def _fwd(x, w, strides, padding):
  """The forward pass under differentiation (training): on the CPU the
  native kernel (`native_kernels.depthwise_conv`), else `_forward`.
  Inference and `jax.export` trace the primal body, XLA's ops only."""
  if native_kernels.depthwise_supported(x, w) and native_kernels.available():
    (pt, pb), (pl, pr) = padding
    y_shape = (x.shape[0],
               _out_size(x.shape[1] + pt + pb, w.shape[0], strides[0]),
               _out_size(x.shape[2] + pl + pr, w.shape[1], strides[1]),
               x.shape[3])
    return native_kernels.depthwise_conv(x, w, strides, padding, y_shape), (x, w)
  return _forward(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, dy):
  """On the CPU the native kernels: the filter gradient, and for stride 1 the
  input gradient (the forward kernel over dy with the flipped filter)."""
  x, w = res
  dy = dy.astype(x.dtype)
  if native_kernels.depthwise_supported(x, w) and native_kernels.available():
    dw = native_kernels.depthwise_filter_grad(x, dy, w.shape, strides, padding)
    if tuple(strides) == (1, 1):
      kh, kw = w.shape[0], w.shape[1]
      (pt, pb), (pl, pr) = padding
      dx = native_kernels.depthwise_conv(
          dy, w[::-1, ::-1], (1, 1),
          ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)), x.shape)
    else:
      dx = _input_grad(dy, w, x.shape, strides, padding)
    return dx, dw.astype(w.dtype)
  return (_input_grad(dy, w, x.shape, strides, padding),
          _filter_grad(x, dy, w, strides, padding))


@jax.named_scope("depthwise_dx")
def _input_grad(dy, w, x_shape, strides, padding):
  """Tap (i, j) read xp[i + sh*a, j + sw*b]: puts dy * w[i, j] back there
  (interior padding sh-1 spreads it to the stride) and sums the taps."""
  kh, kw = w.shape[0], w.shape[1]
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  n, h, wd, c = x_shape
  hp, wp = h + pt + pb, wd + pl + pr
  oh, ow = dy.shape[1], dy.shape[2]
  wx = w.astype(dy.dtype)
  if strides == (1, 1):
    # dx[a, b] = sum_ij dy[a + pt - i, b + pl - j] w[i, j]: the forward's
    # taps over dy padded by (k-1-pt, k-1-pb), with the kernel flipped.
    dyp = _padded(dy, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    dx = None
    for i in range(kh):
      for j in range(kw):
        t = _tap(dyp, kh - 1 - i, kw - 1 - j, h, wd, strides) * wx[i, j, 0]
        dx = t if dx is None else dx + t
    return dx
  zero = jnp.zeros((), dy.dtype)
  dxp = None
  for i in range(kh):
    for j in range(kw):
      hi_h = hp - (i + sh * (oh - 1) + 1)
      hi_w = wp - (j + sw * (ow - 1) + 1)
      t = lax.pad(dy * wx[i, j, 0], zero,
                  ((0, 0, 0), (i, hi_h, sh - 1), (j, hi_w, sw - 1), (0, 0, 0)))
      dxp = t if dxp is None else dxp + t
  return lax.slice(dxp, (0, pt, pl, 0), (n, pt + h, pl + wd, c))


@jax.named_scope("depthwise_dw")
def _filter_grad(x, dy, w, strides, padding):
  """One reduction over (batch, positions) per tap, in float32."""
  kh, kw = w.shape[0], w.shape[1]
  oh, ow = dy.shape[1], dy.shape[2]
  c = x.shape[3]
  # The inner barrier keeps XLA from merging this padded copy with the
  # forward pass's (common-subexpression elimination), which would keep it
  # alive from the forward pass to here.
  xp = _padded(lax.optimization_barrier(x), padding)
  dyf = dy.astype(jnp.float32)
  # Over the batch first (whole images added up, long contiguous rows),
  # then over the positions.
  taps = [jnp.sum(jnp.sum(_tap(xp, i, j, oh, ow, strides).astype(jnp.float32)
                          * dyf, axis=0), axis=(0, 1))
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kh, kw, 1, c).astype(w.dtype)


depthwise_conv.defvjp(_fwd, _bwd)


def applies(lhs_shape, rhs_shape, *, dimension_numbers, feature_group_count,
            batch_group_count=1, lhs_dilation=None, rhs_dilation=None) -> bool:
  """Whether `depthwise_conv` can compute this `lax.conv_general_dilated` call."""
  if len(lhs_shape) != 4 or batch_group_count != 1:
    return False
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  if (tuple(dn.lhs_spec) != _NHWC or tuple(dn.out_spec) != _NHWC
      or tuple(dn.rhs_spec) != _HWIO):
    return False
  channels = lhs_shape[3]
  if not (feature_group_count == channels > 1 and rhs_shape[2] == 1
          and rhs_shape[3] == channels):
    return False
  for d in (lhs_dilation, rhs_dilation):
    if d is not None and any(v != 1 for v in d):
      return False
  return True


def pointwise_applies(lhs_shape, rhs_shape, window_strides, padding, *,
                      dimension_numbers, feature_group_count,
                      batch_group_count=1, lhs_dilation=None,
                      rhs_dilation=None) -> bool:
  """Whether this `lax.conv_general_dilated` call is a 1x1, stride-1, unpadded
  NHWC/HWIO convolution, i.e. a matrix product over the channel axis."""
  if (len(lhs_shape) != 4 or batch_group_count != 1
      or feature_group_count != 1 or tuple(rhs_shape[:2]) != (1, 1)
      or tuple(window_strides) != (1, 1)):
    return False
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  if (tuple(dn.lhs_spec) != _NHWC or tuple(dn.out_spec) != _NHWC
      or tuple(dn.rhs_spec) != _HWIO):
    return False
  for d in (lhs_dilation, rhs_dilation):
    if d is not None and any(v != 1 for v in d):
      return False
  if isinstance(padding, str):
    return padding in ("SAME", "VALID")
  return all(int(v) == 0 for p in padding for v in p)


@jax.named_scope("pointwise")
def pointwise_conv(x, w, precision=None, preferred_element_type=None):
  """A 1x1 convolution of NHWC `x` with HWIO `w` (1, 1, Cin, Cout) as one
  (N*H*W, Cin) @ (Cin, Cout) matrix product.

  XLA:CPU runs 1x1 convolutions through its convolution emitter, whose
  filter gradient (a contraction over every image and position) is slow:
  3-23x a matrix product's at EfficientNet-B3's 112 px shapes; autodiff of
  the product gives matrix products for both gradients.
  """
  n, h, wd, c = x.shape
  y = jnp.dot(x.reshape(n * h * wd, c), w.reshape(c, w.shape[3]),
              precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(n, h, wd, w.shape[3])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None,
                         **kwargs):
  """`lax.conv_general_dilated`, through `depthwise_conv` or `pointwise_conv`
  where they apply.

  Drop-in for `nnx.Conv(conv_general_dilated=...)`. Other convolutions
  (and depthwise ones with a `preferred_element_type`, calls with extra
  keyword arguments other than a None `out_sharding`, and 1x1 convolutions
  of a symbolic batch) go to lax unchanged.
  """
  extra = {k: v for k, v in kwargs.items()
           if not (k == "out_sharding" and v is None)}
  if not extra and isinstance(lhs.shape[0], int) and pointwise_applies(
      lhs.shape, rhs.shape, window_strides, padding,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation):
    return pointwise_conv(lhs, rhs, precision, preferred_element_type)
  if (preferred_element_type is None and not extra and applies(
      lhs.shape, rhs.shape, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation)):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[0:2],
                                    window_strides, padding)
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    return depthwise_conv(lhs, rhs, tuple(int(s) for s in window_strides),
                          padding)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)
