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


def batch_norm(features: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over the channel axis with Keras' epsilon and momentum.

  Scale, bias and the moving statistics stay float32 (`param_dtype`) whatever
  the compute `dtype`; Flax computes batch statistics in at least float32.
  `use_fast_variance=False` computes E[(x-mean)^2] (two passes), like Keras,
  instead of E[x^2]-mean^2, which loses precision in float32/bfloat16.
  """
  return nnx.BatchNorm(
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
