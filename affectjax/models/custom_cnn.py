"""The custom CNN trained from scratch: stages of conv-BN-ReLU, max-pooled between stages.

Architecture (widths=(w1, ..., wn), convs_per_stage=k):

  for each stage i:   k x [Conv3x3(wi, 'same', no bias) -> BatchNorm -> ReLU]
                      then MaxPool 2x2 / stride 2 (except after the last stage)

The last stage's map (H / 2^(n-1), W / 2^(n-1), wn) is the feature map; the
shared head global-average-pools it. Default widths (64, 128, 256, 512) with
2 convs per stage (~4.7 M parameters) suit 112 px AffectNet crops; tests use
e.g. widths=(4, 8).

`impl` (config.model.kwargs.impl) chooses how the same layers are computed:

  'plain'  nnx.max_pool (lax.reduce_window) and autodiff through BatchNorm's
           mean/variance, the textbook formulation.
  'fused'  the 2x2 max-pool as a reshape + max over the window axes,
           BatchNorm's training gradient in closed form
           (`layers.batch_norm_train`), and each conv's filter gradient
           by a native kernel (`native_kernels`), or where it is not
           built, XLA's summed over chunks of FILTER_GRAD_CHUNK images
           (`layers.conv_cpu_filter_grad`). Same parameters, same
           forward values; the gradients are equal within float32
           rounding. On XLA:CPU the plain max-pool's gradient goes through
           a variadic reduce-window that carries argmax indices, the
           BatchNorm gradient takes several passes over every activation,
           and one filter-gradient convolution over the whole batch is
           poorly blocked (docs/BENCHMARKS.md has the profile).
  'auto'   (default) 'fused' when JAX's default backend is the CPU, else
           'plain' (`impl.resolve`, the rule VGG16 and EfficientNet-B3
           share).

The pool's gradient goes to one pixel of each window, the first of equal
maxima, as reduce_window's does. Here the pool follows a ReLU, so equal maxima
are in practice zeros, whose gradient the ReLU stops either way.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from affectjax.models import impl as impl_lib
from affectjax.models import layers
from affectjax.models import preprocessing


class ConvBNReLU(nnx.Module):
  """3x3 'same' conv without bias (BatchNorm supplies the shift), BatchNorm, ReLU."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs,
               fused: bool = False):
    self.conv = layers.conv(in_features, out_features, 3, use_bias=False,
                            dtype=dtype, rngs=rngs,
                            filter_grad_chunk=FILTER_GRAD_CHUNK if fused else 0)
    self.bn = layers.batch_norm(out_features, dtype=dtype, rngs=rngs,
                                fused_grad=fused)

  def __call__(self, x, *, train: bool):
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


# Images per filter-gradient convolution under impl='fused', per device (8 and
# 16 were the fastest of 2-64 at 48 px, batch 64, on XLA:CPU; 8 per device
# of 2 devices beat 4: docs/BENCHMARKS.md).
FILTER_GRAD_CHUNK = 8


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 / stride-2 'VALID' max-pool of an NHWC array as a reshape and a max.

  Equal to nnx.max_pool(x, (2, 2), strides=(2, 2), padding='VALID') (an odd
  trailing row/column is dropped the same way). The gradient (below) is a
  few elementwise compares and selects, which XLA fuses, instead of
  reduce_window's variadic argmax reduction.
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_fwd(x):
  return max_pool_2x2(x), x


def _pool_bwd(x, g):
  """Routes each window's gradient to exactly one of its four inputs.

  The winner is chosen by complementary compares (>= / <) between the
  window's pixels, never by comparing them with the separately computed max:
  jnp.max's own gradient divides by the number of pixels equal to the max,
  and when XLA recomputes the fused pooled values with a different rounding
  (seen at LLVM -O0 with 8 CPU devices) that number is 0 and the gradient
  NaN. Ties go to the first pixel in row-major order, as reduce_window's do.
  """
  n, h, w, c = x.shape
  xe = x[:, :h // 2 * 2, :w // 2 * 2, :]
  a, b, cc, d = xe[:, 0::2, 0::2], xe[:, 0::2, 1::2], xe[:, 1::2, 0::2], xe[:, 1::2, 1::2]
  top, bottom = a >= b, cc >= d
  first = jnp.where(top, a, b) >= jnp.where(bottom, cc, d)
  zero = jnp.zeros_like(g)
  ga = jnp.where(first & top, g, zero)
  gb = jnp.where(first & ~top, g, zero)
  gc = jnp.where(~first & bottom, g, zero)
  gd = jnp.where(~first & ~bottom, g, zero)
  dx = jnp.stack([jnp.stack([ga, gb], axis=3), jnp.stack([gc, gd], axis=3)],
                 axis=2).reshape(n, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


class CustomCNN(nnx.Module):
  """Backbone of conv-BN-ReLU stages; see the module docstring."""

  def __init__(self, *, widths: Sequence[int] = (64, 128, 256, 512),
               convs_per_stage: int = 2, impl: str = "auto",
               dtype=jnp.float32, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1 or convs_per_stage < 1:
      raise ValueError(
          f"custom_cnn needs at least one stage of positive width and "
          f"convs_per_stage >= 1; got widths={widths}, "
          f"convs_per_stage={convs_per_stage} (config.model.kwargs).")
    self.dtype = dtype
    self.impl = impl_lib.resolve("custom_cnn", impl)
    fused = self.impl == "fused"
    self.num_features = widths[-1]
    stages = []
    in_features = 3
    for width in widths:
      stage = []
      for _ in range(convs_per_stage):
        stage.append(ConvBNReLU(in_features, width, dtype=dtype, rngs=rngs,
                                fused=fused))
        in_features = width
      stages.append(nnx.List(stage))
    self.stages = nnx.List(stages)

  @staticmethod
  def default_preprocess(images_uint8: jax.Array) -> jax.Array:
    """x/255 standardized with the ImageNet mean/std (a well-scaled input for scratch training)."""
    return preprocessing.standardize(images_uint8)

  def preprocess(self, images_uint8: jax.Array) -> jax.Array:
    return self.default_preprocess(images_uint8)

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs  # No stochastic layers in the backbone.
    x = x.astype(self.dtype)
    for i, stage in enumerate(self.stages):
      if i > 0:
        if self.impl == "fused":
          x = max_pool_2x2(x)
        else:
          x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for block in stage:
        x = block(x, train=train)
    return x
