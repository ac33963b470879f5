"""Building blocks shared by the backbones: Keras-compatible conv/BN and padding.

Every backbone here must compute exactly what its `keras.applications`
counterpart computes, so the defaults below are Keras' defaults rather than
Flax's: BatchNorm epsilon 1e-3 and momentum 0.99, and padding computed the way
Keras (TensorFlow) computes it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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


def batch_norm(features: int, *, dtype, rngs: nnx.Rngs) -> BatchNorm:
  """BatchNorm over the channel axis with Keras' epsilon and momentum.

  Scale, bias and the moving statistics stay float32 (`param_dtype`) whatever
  the compute `dtype`.
  """
  return BatchNorm(
      features,
      epsilon=KERAS_BN_EPSILON,
      momentum=KERAS_BN_MOMENTUM,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
  )


def conv(in_features: int, out_features: int, kernel_size: int, *,
         strides: int = 1, padding="SAME", use_bias: bool = True,
         groups: int = 1, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A 2D NHWC convolution with float32 parameters and `dtype` compute.

  Flax's 'SAME' padding is TensorFlow's: for stride 2 on an even input the
  extra padding row/column goes at the bottom/right, exactly as Keras
  `padding='same'` does.
  """
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
      rngs=rngs,
  )


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
