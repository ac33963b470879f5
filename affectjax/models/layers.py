"""Building blocks shared by the backbones: Keras-compatible conv/BN and padding.

Every backbone here must compute exactly what its `keras.applications`
counterpart computes, so the defaults below are Keras' defaults rather than
Flax's: BatchNorm epsilon 1e-3 and momentum 0.99, and padding computed the way
Keras (TensorFlow) computes it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from affectjax.models import native_kernels

# The data-parallel mesh axis (affectjax.sharding.DATA_AXIS; models stay
# below the trainer's modules).
DATA_AXIS = "data"
# Keras BatchNormalization defaults. Flax uses epsilon 1e-5, which would make a
# converted model differ from Keras by ~1e-3 relative on small-variance channels.
KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99


class InputStat(nnx.BatchStat):
  """Input-normalization constants that travel with the weights.

  Subclasses `nnx.BatchStat` so that every filter that selects non-trainable
  statistics (checkpointing, `nnx.split(model, nnx.Param, ...)`) also selects
  these; the optimizer never sees them because they are not `nnx.Param`.
  """


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` (same variables, same moving-average rule) with Keras' arithmetic.

  Inference computes x * inv + (beta - mean * inv) with inv = gamma *
  rsqrt(var + eps), in Keras' (JAX backend) operation order; Flax's
  (x - mean) * inv + beta rounds differently, and over EfficientNet's 80-odd
  BatchNorms at 300 px the two drift apart by ~1e-4 relative. Batch
  statistics are always computed in float32 with the two-pass variance
  (jnp.var), like Keras, whatever the compute dtype.
  """

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if mask is not None:
      raise NotImplementedError("masked BatchNorm is not used by these backbones.")
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError("BatchNorm needs use_running_average (pass train=... to the model).")
    axes = tuple(range(x.ndim - 1))  # NHWC: statistics per channel.
    if not use_running_average and getattr(self, "fused_grad", False):
      y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...],
                                      self.epsilon)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1.0 - m) * jax.lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1.0 - m) * jax.lax.stop_gradient(var)
      return y.astype(self.dtype or x.dtype)
    if use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      xf = x.astype(jnp.float32)
      mean, var = jnp.mean(xf, axes), jnp.var(xf, axes)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1.0 - m) * jax.lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1.0 - m) * jax.lax.stop_gradient(var)
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    shift = -mean * inv + self.bias[...]
    dtype = self.dtype or x.dtype
    return jnp.add(x.astype(dtype) * inv.astype(dtype), shift.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
  """Training-mode BatchNorm over the last axis: (y, batch mean, batch variance).

  The forward pass is `BatchNorm.__call__`'s arithmetic (float32 statistics,
  two-pass variance, y = x * inv + (bias - mean * inv)), so y is equal to the
  plain layer's. The gradient is the closed form of the BatchNorm backward
  pass,

    dx = inv / n * (n * dy - sum(dy) - xhat * sum(dy * xhat)),

  two reductions and one elementwise pass over the activations. Autodiff of
  the plain layer instead differentiates mean, two-pass variance and rsqrt
  step by step, which XLA:CPU runs as several more passes over the
  activations (docs/BENCHMARKS.md, train step profile). y is float32.
  """
  return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_stats(x):
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  return xf, jnp.mean(xf, axes), jnp.var(xf, axes)


def _bn_fwd(x, scale, bias, epsilon):
  xf, mean, var = _bn_stats(x)
  rstd = jax.lax.rsqrt(var + epsilon)
  inv = rstd * scale
  y = xf * inv + (-mean * inv + bias)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_bwd(epsilon, res, cotangents):
  del epsilon  # rstd carries it.
  x, mean, rstd, scale = res
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xc = x.astype(jnp.float32) - mean
  xhat = xc * rstd
  dy = dy.astype(jnp.float32)
  sum_dy = jnp.sum(dy, axes)
  sum_dy_xhat = jnp.sum(dy * xhat, axes)
  inv = rstd * scale
  # The running-statistics updates stop the gradient, so dmean and dvar are
  # zero in training; they are kept so that the rule is the full derivative.
  dx = (inv / n) * (n * dy - sum_dy - xhat * sum_dy_xhat) + (
      dmean / n + dvar * (2.0 / n) * xc)
  return dx.astype(x.dtype), sum_dy_xhat, sum_dy


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def batch_norm(features: int, *, dtype, rngs: nnx.Rngs,
               fused_grad: bool = False) -> BatchNorm:
  """BatchNorm over the channel axis with Keras' epsilon and momentum.

  Scale, bias and the moving statistics stay float32 (`param_dtype`) whatever
  the compute `dtype`. `fused_grad=True` trains through `batch_norm_train`
  (the same values, a cheaper gradient on the CPU); inference is unchanged.
  """
  bn = BatchNorm(
      features,
      epsilon=KERAS_BN_EPSILON,
      momentum=KERAS_BN_MOMENTUM,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
  )
  bn.fused_grad = fused_grad
  return bn


def conv(in_features: int, out_features: int, kernel_size: int, *,
         strides: int = 1, padding="SAME", use_bias: bool = True,
         groups: int = 1, dtype, rngs: nnx.Rngs,
         filter_grad_chunk: int = 0, conv_general_dilated=None) -> nnx.Conv:
  """A 2D NHWC convolution with float32 parameters and `dtype` compute.

  Flax's 'SAME' padding is TensorFlow's: for stride 2 on an even input the
  extra padding row/column goes at the bottom/right, exactly as Keras
  `padding='same'` does. `filter_grad_chunk > 0` computes the kernel's
  gradient on the CPU by `conv_cpu_filter_grad` (the native kernel, else
  XLA's in batch chunks of that many images);
  the forward pass is unchanged. `conv_general_dilated` replaces
  `lax.conv_general_dilated` (same signature), e.g.
  `depthwise.conv_general_dilated`; not together with `filter_grad_chunk`.
  """
  conv_fn = conv_general_dilated or jax.lax.conv_general_dilated
  if filter_grad_chunk and conv_general_dilated is not None:
    raise ValueError("conv: filter_grad_chunk and conv_general_dilated "
                     "are exclusive.")
  if filter_grad_chunk:
    conv_fn = functools.partial(conv_cpu_filter_grad,
                                images_per_chunk=filter_grad_chunk)
  return nnx.Conv(
      in_features,
      out_features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      use_bias=use_bias,
      feature_group_count=groups,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
      conv_general_dilated=conv_fn,
      rngs=rngs,
  )


def conv_cpu_filter_grad(lhs, rhs, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None,
                         preferred_element_type=None, *,
                         images_per_chunk: int = 8, native: bool = True,
                         **kwargs):
  """`lax.conv_general_dilated` with a faster filter gradient on the CPU.

  The value and the input gradient are lax's own. The filter gradient is a
  convolution that contracts over the whole batch and every output pixel;
  XLA:CPU runs it as one large, poorly blocked convolution (the biggest item
  of the dense convnets' CPU train step, docs/BENCHMARKS.md). Instead:

  * `native_kernels.filter_grad`, a native kernel (an XLA FFI call),
    where it supports the convolution (CPU backend, float32 NHWC/HWIO, no
    dilation, one group; `native=False` or ``AFFECTJAX_NATIVE_KERNELS=0``
    turn it off);
  * otherwise the same sum taken as one XLA convolution per
    `images_per_chunk` images, accumulated in float32, which XLA:CPU runs
    faster than the whole-batch one (and lax's own gradient when the batch
    is one chunk or less).

  Both equal the plain gradient within float rounding (a different
  summation order).

  Per device: traced under a data-parallel mesh (`sharding.traced_under`, as
  the trainer's step is), the gradient is each device's own images', taken
  inside `jax.shard_map` and added across devices by one `psum`. Chunks of
  the global batch instead made XLA's partitioner split every chunk across
  devices with collective-permutes (16 per layer for 64 images on 2 CPU
  devices), and two devices that took two such permutes in opposite orders
  on a 2-core host deadlocked XLA:CPU's in-process collectives.
  """
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_batch, out_batch = dn.lhs_spec[0], dn.out_spec[0]
  n = lhs.shape[lhs_batch]
  # A symbolic batch (jax.export with a polymorphic batch: inference only)
  # has no chunks to count; lax's own conv serves it.
  if not isinstance(n, int) or batch_group_count != 1:
    return conv(lhs, rhs)
  mesh = jax.sharding.get_abstract_mesh()
  devices = 1
  if not mesh.empty and mesh.axis_names == (DATA_AXIS,):
    devices = mesh.shape[DATA_AXIS]
  if n % devices or lhs_batch != 0 or out_batch != 0:
    devices = 1
  use_native = native and native_kernels.supports(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count)
  if not use_native and n // devices <= images_per_chunk and devices == 1:
    return conv(lhs, rhs)

  def filter_grad(x, g, w):
    """dL/dw summed over x's images (float32)."""
    if use_native and native_kernels.available():  # Builds it once.
      return native_kernels.filter_grad(x, g, w.shape, window_strides,
                                            padding)
    dw = jnp.zeros(w.shape, jnp.float32)
    for start in range(0, x.shape[lhs_batch], images_per_chunk):
      stop = min(start + images_per_chunk, x.shape[lhs_batch])
      xs = jax.lax.slice_in_dim(x, start, stop, axis=lhs_batch)
      gs = jax.lax.slice_in_dim(g, start, stop, axis=out_batch)
      dw = dw + jax.vjp(lambda w, xs=xs: conv(xs, w), w)[1](gs)[0].astype(
          jnp.float32)
    return dw

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
    if devices > 1:
      batch = jax.sharding.PartitionSpec(DATA_AXIS)
      dw = jax.shard_map(
          lambda x, g, w: jax.lax.psum(filter_grad(x, g, w),
                                       DATA_AXIS),
          in_specs=(batch, batch, jax.sharding.PartitionSpec()),
          out_specs=jax.sharding.PartitionSpec(), check_vma=False)(x, g, w)
    else:
      dw = filter_grad(x, g, w)
    return dx, dw.astype(w.dtype)

  f.defvjp(fwd, bwd)
  return f(lhs, rhs)


def keras_correct_pad(height: int, width: int, kernel_size: int):
  """Zero padding Keras puts before a 'valid' stride-2 conv (imagenet_utils.correct_pad).

  The padding is asymmetric: one pixel less at the top/left when the input
  size is even, so that the output is exactly half the input size.
  """
  adjust = (1 - height % 2, 1 - width % 2)
  half = kernel_size // 2
  return ((half - adjust[0], half), (half - adjust[1], half))


def zero_pad(x: jax.Array, pads) -> jax.Array:
  """Pads the spatial axes of an NHWC array: pads = ((top, bottom), (left, right))."""
  return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def drop_connect(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: drops whole examples of a residual branch with prob `rate`.

  Same as Keras `Dropout(rate, noise_shape=(None, 1, 1, 1))`: survivors are
  scaled by 1/(1-rate) so the expectation is unchanged. Randomness comes only
  from the `rngs` passed at call time (the 'dropout' stream), never from module
  state, so a train step stays a pure function of (state, key).
  """
  if rate <= 0.0:
    return x
  if rngs is None:
    raise ValueError(
        "drop-connect is active (training with drop_connect_rate="
        f"{rate}) but no rngs were passed; call the model with "
        "rngs=nnx.Rngs(dropout=key) when train=True.")
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, (x.shape[0], 1, 1, 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
