"""Model contract tests on the tiny custom CNN: shapes, dtypes, BN modes, preprocessing, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affectjax import models
from affectjax.models import (custom_cnn, depthwise, layers, native_kernels,
                              preprocessing)

TINY = dict(widths=(4, 8), head_hidden=8, dropout=0.5)


def _images(n=4, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _bn_stats(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def test_custom_cnn_output_contract():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), num_classes=8, **TINY)
  x = model.preprocess(_images())
  logits, va = model(x)
  assert logits.shape == (4, 8) and logits.dtype == jnp.float32
  assert va.shape == (4, 2) and va.dtype == jnp.float32
  assert np.all(np.abs(np.asarray(va)) <= 1.0)
  feats = model.features(x)
  # Two stages -> one 2x2 max-pool: 16 px -> 8 px, last width 8 channels.
  assert feats.shape == (4, 8, 8, 8)


def test_num_classes_and_module_groups():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), num_classes=5, **TINY)
  logits, _ = model(model.preprocess(_images(2)))
  assert logits.shape == (2, 5)
  params = nnx.state(model, nnx.Param)
  assert set(nnx.to_pure_dict(params)) == {"backbone", "head"}


def test_batchnorm_updates_only_when_training_backbone():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  x = model.preprocess(_images())
  before = _bn_stats(model)
  model(x, train=False)
  model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=1))
  jax.tree.map(np.testing.assert_array_equal, before, _bn_stats(model))
  model(x, train=True, train_backbone=True, rngs=nnx.Rngs(dropout=1))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         before, _bn_stats(model)))
  assert all(changed)


def test_dropout_uses_call_time_rngs_only():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  x = model.preprocess(_images())
  a = model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=3))[0]
  b = model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=3))[0]
  c = model(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=4))[0]
  np.testing.assert_array_equal(a, b)  # Same key -> same masks.
  assert not np.array_equal(a, c)
  # Eval is deterministic and differs from a dropped-out pass.
  e1, e2 = model(x)[0], model(x)[0]
  np.testing.assert_array_equal(e1, e2)
  with pytest.raises(ValueError, match="rngs"):
    model(x, train=True)


def test_preprocess_module_level_matches_model():
  imgs = _images()
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  np.testing.assert_array_equal(models.preprocess("custom_cnn", imgs),
                                model.preprocess(imgs))
  expected = (imgs / 255.0 - np.array(preprocessing.IMAGENET_MEAN_RGB)) / np.array(
      preprocessing.IMAGENET_STD_RGB)
  np.testing.assert_allclose(model.preprocess(imgs), expected, rtol=1e-5, atol=1e-5)


def test_preprocess_is_jittable():
  imgs = _images()
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  np.testing.assert_allclose(jax.jit(model.preprocess)(imgs), model.preprocess(imgs),
                             rtol=1e-5, atol=1e-6)


def test_bad_names_and_kwargs_are_explained():
  with pytest.raises(ValueError, match="config.model.name"):
    models.create("resnet", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="widthz"):
    models.create("custom_cnn", rngs=nnx.Rngs(0), widthz=(4,))
  with pytest.raises(ValueError, match="config.model.dtype"):
    models.create("custom_cnn", rngs=nnx.Rngs(0), dtype="int8", **TINY)


# --- Randomly filled models built abstractly (no per-shape init compiles). ---

# B3's block structure, small: 1/4 width; depth 0.4 keeps 3 residual blocks
# (drop-connect), depth 0.1 one block per stage (cheapest to compile).
SMALL_EFFNET = dict(width_coefficient=0.25, depth_coefficient=0.4)
SHALLOW_EFFNET = dict(width_coefficient=0.25, depth_coefficient=0.1)


def random_model(name, seed=0, **kwargs):
  """models.create under eval_shape, then every variable filled from numpy at a sane scale."""
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
  rng = np.random.default_rng(seed)
  defaults = {"norm_mean": np.array(preprocessing.IMAGENET_MEAN_RGB),
              "norm_variance": np.square(preprocessing.IMAGENET_STD_RGB),
              "norm_rescale": np.ones(3)}
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    leaf, shape = path[-1], var.shape
    if leaf in defaults:
      value = defaults[leaf]
    elif leaf == "kernel":
      value = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[:-1])), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, BN mean.
      value = rng.normal(0.0, 0.1, shape)
    var.set_value(jnp.asarray(value, var.dtype))
  return model


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# bfloat16 has an 8-bit mantissa (~0.4% per rounding); through a few dozen
# layers the outputs drift by ~1%. We promise 3% relative L2 on the logits/va.
BF16_RTOL = 3e-2


@pytest.mark.parametrize("name,kwargs,size", [
    ("custom_cnn", dict(widths=(8, 16)), 16),
    ("vgg16", {}, 32),
    ("efficientnet_b3", SHALLOW_EFFNET, 32),
])
def test_bfloat16_compute_tracks_float32(name, kwargs, size):
  f32 = random_model(name, seed=1, **kwargs)
  bf16 = random_model(name, seed=1, dtype="bfloat16", **kwargs)
  # Parameters and BatchNorm statistics stay float32 under bf16 compute.
  for leaf in jax.tree.leaves(nnx.state(bf16)):
    assert leaf.dtype == jnp.float32
  x = f32.preprocess(_images(4, size, seed=5))
  forward = nnx.jit(lambda m, x: (m.features(x), *m(x)))
  feats32, logits32, va32 = forward(f32, x)
  feats16, logits16, va16 = forward(bf16, x)
  assert feats16.dtype == jnp.bfloat16 and feats32.dtype == jnp.float32
  assert logits16.dtype == jnp.float32 and va16.dtype == jnp.float32
  for ours, ref in ((feats16, feats32), (logits16, logits32), (va16, va32)):
    print(f"{name} bf16 vs f32 relative L2: {_rel_l2(ours, ref):.2e}")
    assert _rel_l2(ours, ref) < BF16_RTOL, (name, _rel_l2(ours, ref))
  # A training forward updates the BN statistics in float32, close to f32's.
  train = nnx.jit(lambda m, x: m(x, train=True, rngs=nnx.Rngs(dropout=0)))
  train(f32, x)
  train(bf16, x)
  s32, s16 = (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) for m in (f32, bf16))
  for a, b in zip(jax.tree.leaves(s16), jax.tree.leaves(s32)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def test_efficientnet_drop_connect_only_in_training():
  model = random_model("efficientnet_b3", seed=2, drop_connect_rate=0.5, dropout=0.0,
                       **SMALL_EFFNET)
  assert any(b.residual and b.drop_rate > 0 for b in model.backbone.blocks)
  x = model.preprocess(_images(4, 32, seed=6))
  feats = nnx.jit(lambda m, x, key: m.features(x, train=True, rngs=nnx.Rngs(dropout=key)))
  snapshot = nnx.clone(model)  # Training forwards move BN stats; compare from one state.
  a = feats(model, x, jax.random.key(0))
  nnx.update(model, nnx.state(snapshot))
  b = feats(model, x, jax.random.key(0))
  nnx.update(model, nnx.state(snapshot))
  c = feats(model, x, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  nnx.update(model, nnx.state(snapshot))
  # Inference (and a frozen backbone during training) never drops.
  no_drop = nnx.jit(lambda m, x: (
      m.features(x), m.features(x, train=False, rngs=nnx.Rngs(dropout=3)), m(x)[0],
      m(x, train=True, train_backbone=False, rngs=nnx.Rngs(dropout=7))[0]))
  f1, f2, logits_eval, logits_frozen = no_drop(model, x)
  np.testing.assert_array_equal(f1, f2)
  np.testing.assert_allclose(logits_frozen, logits_eval, rtol=1e-6)
  with pytest.raises(ValueError, match="rngs"):
    nnx.eval_shape(lambda m: m.features(x, train=True), model)


# --- custom_cnn impl='fused': the same layers computed the CPU-fast way. ---

def _bn_reference(x, scale, bias, eps):
  """Training BatchNorm, (y, mean, var), by plain autodiff-able jnp ops."""
  mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
  inv = jax.lax.rsqrt(var + eps) * scale
  return x * inv + (bias - mean * inv), mean, var


def test_batch_norm_train_closed_form_gradient_matches_autodiff():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(1.0, 2.0, (3, 5, 4, 6)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 1, 6), jnp.float32)
  # Cotangents for all three outputs, so the mean/var terms are checked too.
  cot = (jnp.asarray(rng.normal(size=x.shape), jnp.float32),
         jnp.asarray(rng.normal(size=6), jnp.float32),
         jnp.asarray(rng.normal(size=6), jnp.float32))
  ours, ours_vjp = jax.vjp(lambda *a: layers.batch_norm_train(*a, 1e-3), x, scale, bias)
  ref, ref_vjp = jax.vjp(lambda *a: _bn_reference(*a, 1e-3), x, scale, bias)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(ours_vjp(cot), ref_vjp(cot)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_max_pool_2x2_matches_reduce_window():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 7, 6, 3)), jnp.float32)
  np.testing.assert_array_equal(
      custom_cnn.max_pool_2x2(x),
      nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


def test_max_pool_2x2_gradient_is_reduce_windows_with_ties():
  """One pixel per window gets the gradient, the first of equal maxima, as
  reduce_window's; jnp.max's gradient splits it between ties (and is NaN
  when XLA recomputes the pooled values with another rounding)."""
  rng = np.random.default_rng(6)
  x = jnp.maximum(jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32), 0)
  x = x.at[0, 0, 0, 0].set(1.5).at[0, 0, 1, 0].set(1.5)  # A tie that wins.
  pooled = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  g = jnp.asarray(rng.normal(size=pooled.shape), jnp.float32)
  grad = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))(x)
  ours = grad(custom_cnn.max_pool_2x2)
  ref = grad(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))
  np.testing.assert_array_equal(ours, ref)
  assert ours[0, 0, 0, 0] == g[0, 0, 0, 0] and ours[0, 0, 1, 0] == 0


def _native_kernels(monkeypatch, on: bool) -> list:
  """The fused convs' filter gradient: the native kernel (asserted built) or XLA's chunks.

  Returns the list that records each traced native call, for the caller to
  check which path ran.
  """
  if on:
    assert native_kernels.available(), native_kernels.unavailable_reason()
  else:
    monkeypatch.setattr(native_kernels, "available", lambda: False)
  calls, kernel = [], native_kernels.filter_grad

  def counted(*args, **kwargs):
    calls.append(args[2])  # the kernel's shape
    return kernel(*args, **kwargs)

  monkeypatch.setattr(native_kernels, "filter_grad", counted)
  return calls


@pytest.mark.parametrize("native", [True, False])
def test_custom_cnn_fused_impl_equals_plain(monkeypatch, native):
  """Same variables, same outputs, same BN statistics, gradients within float32 rounding."""
  monkeypatch.setattr(custom_cnn, "FILTER_GRAD_CHUNK", 3)  # Chunks of 3 + 1 images.
  native_calls = _native_kernels(monkeypatch, native)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 17, 16, 3)), jnp.float32)
  results = {}
  for impl in ("plain", "fused"):
    model = models.create("custom_cnn", rngs=nnx.Rngs(0), widths=(4, 8, 8),
                          head_hidden=8, dropout=0.0, impl=impl)
    assert model.backbone.impl == impl

    def loss(m):
      logits, va = m(x, train=True)
      return jnp.sum(logits ** 2) + jnp.sum(va)

    value, grads = nnx.value_and_grad(loss)(model)
    results[impl] = (value, model(x)[0], nnx.to_pure_dict(grads),
                     _bn_stats(model))
  assert bool(native_calls) == native  # The path under test ran.
  (v0, e0, g0, s0), (v1, e1, g1, s1) = results["plain"], results["fused"]
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s0)


def test_custom_cnn_impl_auto_and_bad_name():
  model = models.create("custom_cnn", rngs=nnx.Rngs(0), **TINY)
  assert model.backbone.impl == ("fused" if jax.default_backend() == "cpu" else "plain")
  with pytest.raises(ValueError, match="config.model.kwargs.impl"):
    models.create("custom_cnn", rngs=nnx.Rngs(0), impl="fast", **TINY)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), ((0, 1), (1, 1)))])
def test_conv_cpu_filter_grad_matches_lax(strides, padding, native):
  """The native kernel's and the chunked XLA filter gradients (tests/test_native_kernels.py: the kernel alone)."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(5, 7, 6, 3)), jnp.float32)  # 5 = 2 + 2 + 1.
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")

  def run(fn):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding, dimension_numbers=dn), x, w)
    g = jnp.asarray(np.random.default_rng(7).normal(size=y.shape), jnp.float32)
    return (y, *vjp(g))

  ours = run(functools.partial(layers.conv_cpu_filter_grad, images_per_chunk=2,
                               native=native))
  ref = run(jax.lax.conv_general_dilated)
  for a, b in zip(ours, ref):  # value, input gradient, filter gradient
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --- depthwise convolutions as shifted multiply-adds (EfficientNet impl='fused'). ---

def _depthwise_lax(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((3, 7, 6, 5), 3, (1, 1), "SAME"),
    ((2, 9, 8, 4), 5, (1, 1), "SAME"),
    ((3, 7, 6, 5), 3, (2, 2), "SAME"),       # Odd height, stride 2.
    ((2, 9, 11, 3), 5, (2, 2), "SAME"),
    ((2, 8, 8, 4), 3, (2, 2), ((0, 1), (0, 1))),  # Keras' correct_pad + VALID.
    ((2, 8, 7, 4), 5, (2, 2), ((1, 2), (2, 2))),
    ((2, 6, 7, 3), 3, (2, 1), "VALID"),
    ((2, 5, 5, 3), 3, (1, 1), ((2, 0), (1, 3))),  # Padding over a kernel's reach.
])
def test_depthwise_conv_matches_lax(shape, kernel, strides, padding):
  """Value, input gradient and filter gradient equal lax's grouped convolution."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, shape[-1])), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")

  def run(fn):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding, dimension_numbers=dn,
                                     feature_group_count=shape[-1]), x, w)
    g = jnp.asarray(np.random.default_rng(9).normal(size=y.shape), jnp.float32)
    return (y, *vjp(g))

  ours = jax.jit(lambda: run(depthwise.conv_general_dilated))()
  ref = run(jax.lax.conv_general_dilated)
  for a, b in zip(ours, ref):  # value, input gradient, filter gradient
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_general_dilated_leaves_other_convs_to_lax(monkeypatch):
  """Dense, dilated, channel-multiplier and NCHW convs are not depthwise_conv's."""
  calls = []
  real = depthwise.depthwise_conv
  monkeypatch.setattr(depthwise, "depthwise_conv",
                      lambda *a: calls.append(a) or real(*a))
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  others = [
      (x, rng.normal(size=(3, 3, 4, 4)), dict(feature_group_count=1)),
      (x, rng.normal(size=(3, 3, 1, 4)), dict(feature_group_count=4,
                                              rhs_dilation=(2, 2))),
      (x, rng.normal(size=(3, 3, 1, 8)), dict(feature_group_count=4)),
      (x, rng.normal(size=(3, 3, 2, 4)), dict(feature_group_count=2)),
  ]
  for lhs, rhs, kw in others:
    rhs = jnp.asarray(rhs, jnp.float32)
    np.testing.assert_array_equal(
        depthwise.conv_general_dilated(lhs, rhs, (1, 1), "SAME",
                                       dimension_numbers=dn, **kw),
        jax.lax.conv_general_dilated(lhs, rhs, (1, 1), "SAME",
                                     dimension_numbers=dn, **kw))
  assert not calls
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)
  depthwise.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                 feature_group_count=4)
  assert len(calls) == 1


@pytest.mark.slow  # Four EfficientNet compiles.
def test_efficientnet_fused_impl_equals_plain():
  """Same variables, outputs, BN statistics; gradients within float32 rounding."""
  x = jnp.asarray(np.random.default_rng(11).normal(size=(3, 35, 33, 3)), jnp.float32)
  results = {}
  for impl in ("plain", "fused"):
    model = random_model("efficientnet_b3", seed=3, impl=impl, head_hidden=8,
                         dropout=0.0, drop_connect_rate=0.0, **SHALLOW_EFFNET)
    assert model.backbone.impl == impl

    def loss(m):
      logits, va = m(x, train=True)
      return jnp.sum(logits ** 2) + jnp.sum(va)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    results[impl] = (value, nnx.jit(lambda m: m(x)[0])(model),
                     nnx.to_pure_dict(grads), _bn_stats(model))
  (v0, e0, g0, s0), (v1, e1, g1, s1) = results["plain"], results["fused"]
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  # Some gradients are zero but for rounding (a BN bias whose shift the next
  # training BN removes), so the tolerance also scales with the largest.
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(g0))
  for (path, a), b in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(
        a, b, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(b))) + 1e-6 * scale,
        err_msg=jax.tree_util.keystr(path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), s1, s0)


def test_efficientnet_impl_auto_and_bad_name():
  model = nnx.eval_shape(lambda: models.create("efficientnet_b3", rngs=nnx.Rngs(0),
                                               **SHALLOW_EFFNET))
  assert model.backbone.impl == ("fused" if jax.default_backend() == "cpu" else "plain")
  with pytest.raises(ValueError, match="config.model.kwargs.impl"):
    models.create("efficientnet_b3", rngs=nnx.Rngs(0), impl="fast", **SHALLOW_EFFNET)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 0), (0, 0))])
def test_pointwise_conv_matches_lax(padding, monkeypatch):
  """1x1 convolutions as matrix products: value and both gradients equal lax's."""
  calls = []
  real = depthwise.pointwise_conv
  monkeypatch.setattr(depthwise, "pointwise_conv",
                      lambda *a: calls.append(a) or real(*a))
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(3, 5, 7, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 6, 4)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")

  def run(fn):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, (1, 1), padding, dimension_numbers=dn), x, w)
    g = jnp.asarray(np.random.default_rng(13).normal(size=y.shape), jnp.float32)
    return (y, *vjp(g))

  ours = run(depthwise.conv_general_dilated)
  assert len(calls) == 1
  for a, b in zip(ours, run(jax.lax.conv_general_dilated)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Strided or padded 1x1 convs are not matrix products: lax's.
  for strides, pad in (((2, 2), "SAME"), ((1, 1), ((1, 0), (0, 0)))):
    np.testing.assert_array_equal(
        depthwise.conv_general_dilated(x, w, strides, pad, dimension_numbers=dn),
        jax.lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=dn))
  assert len(calls) == 1


@pytest.mark.parametrize("native", [True, False])
def test_vgg16_fused_impl_equals_plain(monkeypatch, native):
  """Native or chunked filter gradients and the reshape pool: same values, gradients within rounding."""
  from affectjax.models import vgg16  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(vgg16, "FILTER_GRAD_CHUNK", 2)  # Chunks of 2 + 1 images.
  native_calls = _native_kernels(monkeypatch, native)
  x = jnp.asarray(np.random.default_rng(14).normal(size=(3, 35, 33, 3)), jnp.float32)
  results = {}
  for impl in ("plain", "fused"):
    model = random_model("vgg16", seed=4, impl=impl, width_multiplier=1 / 16,
                         head_hidden=8, dropout=0.0)
    assert model.backbone.impl == impl

    def loss(m):
      logits, va = m(x, train=True)
      return jnp.sum(logits ** 2) + jnp.sum(va)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    results[impl] = (value, nnx.jit(lambda m: m(x)[0])(model), nnx.to_pure_dict(grads))
  assert bool(native_calls) == native  # The path under test ran.
  (v0, e0, g0), (v1, e1, g1) = results["plain"], results["fused"]
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))),
                               err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="config.model.kwargs.impl"):
    models.create("vgg16", rngs=nnx.Rngs(0), impl="fast", width_multiplier=1 / 16)


def test_efficientnet_swish_gradient_matches_autodiff():
  from affectjax.models import efficientnet  # pylint: disable=g-import-not-at-top
  x = jnp.linspace(-30.0, 30.0, 601, dtype=jnp.float32)
  g = jnp.asarray(np.random.default_rng(15).normal(size=x.shape), jnp.float32)
  np.testing.assert_array_equal(efficientnet.swish(x), nnx.swish(x))
  ours = jax.grad(lambda x: jnp.sum(efficientnet.swish(x) * g))(x)
  ref = jax.grad(lambda x: jnp.sum(nnx.swish(x) * g))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
