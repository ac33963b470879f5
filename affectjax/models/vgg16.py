"""VGG16 backbone, layer for layer `keras.applications.VGG16(include_top=False)`.

Five blocks of 3x3 'same' convolutions with bias and ReLU (64, 128, 256, 512,
512 filters; 2, 2, 3, 3, 3 convs), each followed by a 2x2/2 'valid' max pool,
so a 224 px input gives a 7x7x512 map. There is no BatchNorm. Inputs use
Keras' 'caffe' preprocessing (BGR, ImageNet channel means subtracted, no
scaling) because that is what the ImageNet weights were trained on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from affectjax.models import custom_cnn
from affectjax.models import impl as impl_lib
from affectjax.models import keras_plan
from affectjax.models import layers
from affectjax.models import preprocessing

_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# Images per filter-gradient convolution under impl='fused' where the native
# kernel is off (layers.conv_cpu_filter_grad).
FILTER_GRAD_CHUNK = 8


class VGG16(nnx.Module):
  """Feature extractor: (B, H, W, 3) caffe-preprocessed -> (B, H/32, W/32, 512).

  `width_multiplier` scales every block's filters; it exists only so tests
  and CPU demos can run the same code path small. ImageNet weights need 1.0
  (loading checks every shape).
  """

  def __init__(self, *, width_multiplier: float = 1.0, impl: str = "auto",
               dtype=jnp.float32, rngs: nnx.Rngs):
    if width_multiplier <= 0:
      raise ValueError(f"vgg16 width_multiplier must be > 0 (config.model.kwargs), "
                       f"got {width_multiplier}.")
    self.dtype = dtype
    self.impl = impl_lib.resolve("vgg16", impl)
    fused = self.impl == "fused"
    blocks = []
    in_features = 3
    for filters, repeats in _BLOCKS:
      filters = max(1, int(round(filters * width_multiplier)))
      convs = []
      for _ in range(repeats):
        convs.append(layers.conv(
            in_features, filters, 3, dtype=dtype, rngs=rngs,
            filter_grad_chunk=FILTER_GRAD_CHUNK if fused else 0))
        in_features = filters
      blocks.append(nnx.List(convs))
    self.blocks = nnx.List(blocks)
    self.num_features = in_features

  @staticmethod
  def default_preprocess(images_uint8: jax.Array) -> jax.Array:
    return preprocessing.caffe(images_uint8)

  def preprocess(self, images_uint8: jax.Array) -> jax.Array:
    """Keras 'caffe' mode: RGB->BGR, minus the BGR ImageNet means (0..255 scale)."""
    return self.default_preprocess(images_uint8)

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Feature map (B, H/32, W/32, 512) of a caffe-preprocessed batch."""
    return self.intermediates(x, train=train, rngs=rngs)["block5_pool"]

  def intermediates(self, x: jax.Array, *, train: bool = False,
                    rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Every block's pooled output, keyed by Keras layer name 'block{b}_pool'."""
    del train, rngs  # No BatchNorm or stochastic layers in VGG16.
    out = {}
    x = x.astype(self.dtype)
    for b, convs in enumerate(self.blocks):
      for conv in convs:
        x = nnx.relu(conv(x))
      if self.impl == "fused":
        x = custom_cnn.max_pool_2x2(x)
      else:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      out[f"block{b + 1}_pool"] = x
    return out

  def keras_weight_plan(self) -> keras_plan.Plan:
    """Keras layer 'block{b}_conv{c}' -> self.blocks[b-1][c-1], in Keras' layer order."""
    return {f"block{b + 1}_conv{c + 1}": keras_plan.conv(conv)
            for b, convs in enumerate(self.blocks) for c, conv in enumerate(convs)}

  def keras_extra_values(self, *, imagenet_rescale: bool) -> list:
    """Values a Keras file does not hold: none (caffe preprocessing has no weights)."""
    del imagenet_rescale
    return []
