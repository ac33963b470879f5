"""Input normalizations, one per family of weights (timm-style: weights carry their preprocessing).

All functions take uint8 (or float 0..255) RGB images (..., H, W, 3) and return
float32 arrays; they are jnp-only so the trainer can run them as the first op
of its jitted step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# ImageNet RGB statistics on the 0..1 scale (torchvision / Keras 'torch' mode).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# Keras 'caffe' mode (VGG16): BGR channel means on the 0..255 scale, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# keras.backend.epsilon(): Keras' Normalization layer divides by max(sqrt(var), eps).
KERAS_EPSILON = 1e-7


def caffe(images: jax.Array) -> jax.Array:
  """Keras 'caffe' preprocessing (VGG16): RGB->BGR, then subtract the BGR means."""
  x = jnp.asarray(images, jnp.float32)[..., ::-1]
  return x - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)


def standardize(images: jax.Array, mean=IMAGENET_MEAN_RGB, variance=None,
                rescale=None) -> jax.Array:
  """EfficientNet-style: x/255, then Keras Normalization, then an optional per-channel rescale.

  Computes ((x / 255) - mean) / max(sqrt(variance), 1e-7) * rescale, the same
  op order as Keras' Rescaling -> Normalization -> Rescaling stem. `variance`
  defaults to the squared ImageNet std, `rescale` to 1.
  """
  x = jnp.asarray(images, jnp.float32) * jnp.float32(1.0 / 255.0)
  mean = jnp.asarray(mean, jnp.float32)
  if variance is None:
    variance = jnp.square(jnp.asarray(IMAGENET_STD_RGB, jnp.float32))
  x = (x - mean) / jnp.maximum(jnp.sqrt(jnp.asarray(variance, jnp.float32)),
                               KERAS_EPSILON)
  if rescale is not None:
    x = x * jnp.asarray(rescale, jnp.float32)
  return x
