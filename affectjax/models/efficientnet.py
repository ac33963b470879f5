"""EfficientNet-B3 backbone, layer for layer `keras.applications.EfficientNetB3(include_top=False)`.

Width 1.2, depth 1.4 (26 MBConv blocks), swish everywhere, squeeze-and-
excitation (ratio 0.25 of the block input width) in every block, BatchNorm
epsilon 1e-3, stochastic depth (drop-connect) growing linearly from 0 to
`drop_connect_rate` over the blocks, active only in training.

Padding follows Keras exactly: stride-2 convolutions (the stem and the first
depthwise conv of four stages) are preceded by an explicit, asymmetric
ZeroPadding2D (`imagenet_utils.correct_pad`: one pixel less at top/left for
even inputs) and run 'valid'; every stride-1 conv is 'same'.

Preprocessing lives in the model because Keras puts it in the model:
Rescaling(1/255) -> Normalization(mean, variance) [weights in the file] ->
Rescaling(1/sqrt(std)) [only added by Keras for weights='imagenet', see
keras/src/applications/efficientnet.py and tensorflow#49930: the official
file stores the std, not its square, as the variance]. The three vectors are
`InputStat` variables, overwritten when weights are loaded. A freshly built
model computes (x/255 - mean) / std, the standard ImageNet normalization,
which is also what the converted official weights compute.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affectjax.models import depthwise
from affectjax.models import impl as impl_lib
from affectjax.models import keras_plan
from affectjax.models import layers
from affectjax.models import preprocessing

# keras.applications.efficientnet.DEFAULT_BLOCKS_ARGS (the B0 stages).
_B0_STAGES = (
    # kernel, repeats, filters_in, filters_out, expand_ratio, strides
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
_SE_RATIO = 0.25


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Keras' round_filters: scale, round to a multiple of 8, never drop >10%."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@jax.custom_vjp
def swish(x):
  """x * sigmoid(x), as `nnx.swish`, with a one-pass gradient (impl='fused').

  The gradient, g * s * (1 + x * (1 - s)) with s = sigmoid(x), is computed
  from x alone in one elementwise pass; autodiff of x * sigmoid(x) keeps s
  and x and takes more passes over each activation on XLA:CPU.
  """
  return nnx.swish(x)


def _swish_fwd(x):
  return nnx.swish(x), x


def _swish_bwd(x, g):
  s = jax.nn.sigmoid(x)
  return (g * (s * (1 + x * (1 - s))),)


swish.defvjp(_swish_fwd, _swish_bwd)


class MBConv(nnx.Module):
  """Keras efficientnet.block: expand 1x1 -> depthwise -> SE -> project 1x1 (+ drop-connect skip)."""

  def __init__(self, *, filters_in, filters_out, kernel_size, strides,
               expand_ratio, drop_rate, dtype, rngs, fused: bool = False):
    self.kernel_size = kernel_size
    self.fused = fused
    self.strides = strides
    self.drop_rate = float(drop_rate)
    self.residual = strides == 1 and filters_in == filters_out
    filters = filters_in * expand_ratio
    # impl='fused': depthwise convs as shifted multiply-adds, 1x1 convs as
    # matrix products (depthwise.conv_general_dilated; others go to lax).
    fast = dict(conv_general_dilated=depthwise.conv_general_dilated if fused
                else None)
    if expand_ratio != 1:
      self.expand_conv = layers.conv(filters_in, filters, 1, use_bias=False,
                                     dtype=dtype, rngs=rngs, **fast)
      self.expand_bn = layers.batch_norm(filters, dtype=dtype, rngs=rngs, fused_grad=fused)
    else:
      self.expand_conv = self.expand_bn = None
    self.dwconv = layers.conv(filters, filters, kernel_size, strides=strides,
                              padding="VALID" if strides == 2 else "SAME",
                              use_bias=False, groups=filters, dtype=dtype, rngs=rngs,
                              **fast)
    self.bn = layers.batch_norm(filters, dtype=dtype, rngs=rngs, fused_grad=fused)
    filters_se = max(1, int(filters_in * _SE_RATIO))
    self.se_reduce = layers.conv(filters, filters_se, 1, dtype=dtype, rngs=rngs,
                                 **fast)
    self.se_expand = layers.conv(filters_se, filters, 1, dtype=dtype, rngs=rngs,
                                 **fast)
    self.project_conv = layers.conv(filters, filters_out, 1, use_bias=False,
                                    dtype=dtype, rngs=rngs, **fast)
    self.project_bn = layers.batch_norm(filters_out, dtype=dtype, rngs=rngs, fused_grad=fused)

  def __call__(self, inputs, *, train: bool, rngs):
    act = swish if self.fused else nnx.swish
    x = inputs
    if self.expand_conv is not None:
      x = act(self.expand_bn(self.expand_conv(x), use_running_average=not train))
    if self.strides == 2:
      x = layers.zero_pad(x, layers.keras_correct_pad(x.shape[1], x.shape[2],
                                                      self.kernel_size))
    x = act(self.bn(self.dwconv(x), use_running_average=not train))
    # Squeeze-and-excitation: per-channel gates from the global average.
    with jax.named_scope("squeeze_excite"):  # Op names for step_profile.py.
      se = jnp.mean(x, axis=(1, 2), keepdims=True)
      se = act(self.se_reduce(se))
      se = nnx.sigmoid(self.se_expand(se))
      x = x * se
    x = self.project_bn(self.project_conv(x), use_running_average=not train)
    if self.residual:
      if train:
        x = layers.drop_connect(x, self.drop_rate, rngs)
      x = x + inputs
    return x

  def keras_weight_plan(self, prefix: str):
    plan = {}
    if self.expand_conv is not None:
      plan[f"{prefix}expand_conv"] = keras_plan.conv(self.expand_conv)
      plan[f"{prefix}expand_bn"] = keras_plan.batch_norm(self.expand_bn)
    plan[f"{prefix}dwconv"] = keras_plan.depthwise_conv(self.dwconv)
    plan[f"{prefix}bn"] = keras_plan.batch_norm(self.bn)
    plan[f"{prefix}se_reduce"] = keras_plan.conv(self.se_reduce)
    plan[f"{prefix}se_expand"] = keras_plan.conv(self.se_expand)
    plan[f"{prefix}project_conv"] = keras_plan.conv(self.project_conv)
    plan[f"{prefix}project_bn"] = keras_plan.batch_norm(self.project_bn)
    return plan


class EfficientNet(nnx.Module):
  """Keras EfficientNet feature extractor (everything up to top_activation)."""

  def __init__(self, *, width_coefficient: float, depth_coefficient: float,
               drop_connect_rate: float = 0.2, impl: str = "auto",
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.impl = impl_lib.resolve("efficientnet_b3", impl)
    fused = self.impl == "fused"
    if not 0.0 <= drop_connect_rate < 1.0:
      raise ValueError(f"drop_connect_rate must be in [0, 1) "
                       f"(config.model.kwargs), got {drop_connect_rate}.")
    self.dtype = dtype
    rf = lambda f: _round_filters(f, width_coefficient)
    # Input normalization (Keras stem layers `normalization` and the
    # imagenet-only `rescaling_1`), float32 whatever the compute dtype.
    self.norm_mean = layers.InputStat(jnp.asarray(preprocessing.IMAGENET_MEAN_RGB, jnp.float32))
    self.norm_variance = layers.InputStat(
        jnp.square(jnp.asarray(preprocessing.IMAGENET_STD_RGB, jnp.float32)))
    self.norm_rescale = layers.InputStat(jnp.ones((3,), jnp.float32))

    stem = rf(32)
    self.stem_conv = layers.conv(3, stem, 3, strides=2, padding="VALID",
                                 use_bias=False, dtype=dtype, rngs=rngs)
    self.stem_bn = layers.batch_norm(stem, dtype=dtype, rngs=rngs, fused_grad=fused)
    total = float(sum(_round_repeats(s[1], depth_coefficient) for s in _B0_STAGES))
    blocks, names, b = [], [], 0
    for i, (k, repeats, f_in, f_out, expand, strides) in enumerate(_B0_STAGES):
      f_in, f_out = rf(f_in), rf(f_out)
      for j in range(_round_repeats(repeats, depth_coefficient)):
        blocks.append(MBConv(
            filters_in=f_in if j == 0 else f_out, filters_out=f_out,
            kernel_size=k, strides=strides if j == 0 else 1,
            expand_ratio=expand, drop_rate=drop_connect_rate * b / total,
            dtype=dtype, rngs=rngs, fused=fused))
        names.append(f"block{i + 1}{chr(j + 97)}_")
        b += 1
    self.blocks = nnx.List(blocks)
    self.block_names = tuple(names)
    self.num_features = rf(1280)
    self.top_conv = layers.conv(
        f_out, self.num_features, 1, use_bias=False, dtype=dtype, rngs=rngs,
        conv_general_dilated=depthwise.conv_general_dilated if fused else None)
    self.top_bn = layers.batch_norm(self.num_features, dtype=dtype, rngs=rngs,
                                    fused_grad=fused)

  @staticmethod
  def default_preprocess(images_uint8: jax.Array) -> jax.Array:
    return preprocessing.standardize(images_uint8)

  def preprocess(self, images_uint8: jax.Array) -> jax.Array:
    """Keras' in-model stem: x/255, Normalization(mean, variance), optional rescale."""
    return preprocessing.standardize(images_uint8, self.norm_mean[...],
                                     self.norm_variance[...], self.norm_rescale[...])

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Feature map (B, ceil(H/32), ceil(W/32), 1536) of a preprocessed batch."""
    return self.intermediates(x, train=train, rngs=rngs)["top_activation"]

  def intermediates(self, x: jax.Array, *, train: bool = False,
                    rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Outputs of the stem, every block and the top, keyed by Keras layer name.

    Keys: 'stem_activation', then per block '<block>add' (residual blocks) or
    '<block>project_bn', then 'top_activation' (the feature map).
    """
    out = {}
    x = x.astype(self.dtype)
    x = layers.zero_pad(x, layers.keras_correct_pad(x.shape[1], x.shape[2], 3))
    act = swish if self.impl == "fused" else nnx.swish
    x = act(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    out["stem_activation"] = x
    for name, block in zip(self.block_names, self.blocks):
      x = block(x, train=train, rngs=rngs)
      out[name + ("add" if block.residual else "project_bn")] = x
    x = act(self.top_bn(self.top_conv(x), use_running_average=not train))
    out["top_activation"] = x
    return out

  def keras_weight_plan(self) -> keras_plan.Plan:
    """Keras layer names -> variables, in the order of Keras' model.layers.

    The official file calls the input-normalization layer 'normalization';
    Keras models built in one session number it ('normalization_3'). Names
    are not matched (Keras loads by order), so both load.
    """
    plan = {
        "normalization": keras_plan.Layer("normalization", [
            keras_plan.Target(self.norm_mean, "mean"),
            keras_plan.Target(self.norm_variance, "variance"),
            keras_plan.Target(None, "count")]),
        "stem_conv": keras_plan.conv(self.stem_conv),
        "stem_bn": keras_plan.batch_norm(self.stem_bn),
    }
    for name, block in zip(self.block_names, self.blocks):
      plan.update(block.keras_weight_plan(name))
    plan["top_conv"] = keras_plan.conv(self.top_conv)
    plan["top_bn"] = keras_plan.batch_norm(self.top_bn)
    return plan

  def keras_extra_values(self, *, imagenet_rescale: bool) -> list:
    """Keras' extra Rescaling(1/sqrt(std)) that only weights='imagenet' models have.

    It is a constant in Keras' graph, not a weight in the file, so it is
    returned here as (variable, host array) for the loader to assign.
    """
    if imagenet_rescale:
      rescale = 1.0 / np.sqrt(np.asarray(preprocessing.IMAGENET_STD_RGB, np.float64))
    else:
      rescale = np.ones((3,))
    return [(self.norm_rescale, np.asarray(rescale, np.float32))]


class EfficientNetB3(EfficientNet):
  """keras.applications.EfficientNetB3: width 1.2, depth 1.4, default 300 px.

  `width_coefficient` / `depth_coefficient` exist only so tests and CPU demos
  can build a shrunken network through the same code path; ImageNet weights
  need the defaults (loading checks every shape).
  """

  def __init__(self, *, drop_connect_rate: float = 0.2,
               width_coefficient: float = 1.2, depth_coefficient: float = 1.4,
               impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(width_coefficient=width_coefficient,
                     depth_coefficient=depth_coefficient,
                     drop_connect_rate=drop_connect_rate, impl=impl,
                     dtype=dtype, rngs=rngs)
