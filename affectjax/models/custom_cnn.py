"""The custom CNN trained from scratch: stages of conv-BN-ReLU, max-pooled between stages.

Architecture (widths=(w1, ..., wn), convs_per_stage=k):

  for each stage i:   k x [Conv3x3(wi, 'same', no bias) -> BatchNorm -> ReLU]
                      then MaxPool 2x2 / stride 2 (except after the last stage)

The last stage's map (H / 2^(n-1), W / 2^(n-1), wn) is the feature map; the
shared head global-average-pools it. Default widths (64, 128, 256, 512) with
2 convs per stage (~4.7 M parameters) suit 112 px AffectNet crops; tests use
e.g. widths=(4, 8).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from affectjax.models import layers
from affectjax.models import preprocessing


class ConvBNReLU(nnx.Module):
  """3x3 'same' conv without bias (BatchNorm supplies the shift), BatchNorm, ReLU."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs):
    self.conv = layers.conv(in_features, out_features, 3, use_bias=False,
                            dtype=dtype, rngs=rngs)
    self.bn = layers.batch_norm(out_features, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class CustomCNN(nnx.Module):
  """Backbone of conv-BN-ReLU stages; see the module docstring."""

  def __init__(self, *, widths: Sequence[int] = (64, 128, 256, 512),
               convs_per_stage: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1 or convs_per_stage < 1:
      raise ValueError(
          f"custom_cnn needs at least one stage of positive width and "
          f"convs_per_stage >= 1; got widths={widths}, "
          f"convs_per_stage={convs_per_stage} (config.model.kwargs).")
    self.dtype = dtype
    self.num_features = widths[-1]
    stages = []
    in_features = 3
    for width in widths:
      stage = []
      for _ in range(convs_per_stage):
        stage.append(ConvBNReLU(in_features, width, dtype=dtype, rngs=rngs))
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
        x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for block in stage:
        x = block(x, train=train)
    return x
