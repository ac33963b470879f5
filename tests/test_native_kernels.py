"""The native CPU filter-gradient kernel (affectjax.models.native_kernels).

Its output is checked against lax's own filter gradient (`jax.vjp` of
`lax.conv_general_dilated`) over odd sizes, strides, paddings, kernel shapes
and channel counts that leave every tail of its tiles; its build against a
real compiler, the cache key, and the fallback when the build fails.
"""
import os
import platform
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affectjax.models import layers, native_kernels

DN = ("NHWC", "HWIO", "NHWC")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lax_filter_grad(x, w, dy, strides, padding):
  conv = lambda w: jax.lax.conv_general_dilated(x, w, strides, padding,
                                                dimension_numbers=DN)
  return jax.vjp(conv, w)[1](dy)[0]


def test_kernel_builds_and_registers_here():
  # CI and every machine of this project have g++: the kernel must be on.
  assert native_kernels.available(), native_kernels.unavailable_reason()
  path = native_kernels.build()
  assert path.exists() and path.suffix == ".so"
  assert path.parent == native_kernels._cache_dir()
  mtime = path.stat().st_mtime_ns
  assert native_kernels.build() == path  # Cached: not built again.
  assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "n,h,w,ci,co,kernel,strides,padding",
    [
        (4, 12, 12, 32, 32, (3, 3), (1, 1), "SAME"),     # whole tiles
        (3, 7, 5, 5, 35, (3, 3), (1, 1), "SAME"),        # channel tails, odd sizes
        (2, 9, 11, 13, 40, (3, 3), (2, 2), "SAME"),      # stride 2, odd input
        (2, 10, 10, 7, 9, (3, 3), (2, 2), "VALID"),      # fewer outputs than one vector
        (1, 6, 6, 32, 64, (1, 1), (1, 1), "SAME"),       # 1x1, one image
        (2, 12, 13, 12, 33, (5, 3), (2, 1), ((2, 1), (0, 3))),  # explicit pads
        (5, 7, 7, 29, 48, (3, 3), (3, 2), "SAME"),       # stride 3 x 2
        (3, 15, 16, 3, 17, (7, 7), (2, 2), "SAME"),      # a stem: 3 channels in
        (2, 4, 4, 1, 1, (3, 3), (1, 1), ((3, 3), (3, 3))),  # padding past the kernel
    ])
def test_filter_grad_equals_lax(n, h, w, ci, co, kernel, strides, padding):
  rng = np.random.default_rng(h * 100 + co)
  x = jnp.asarray(rng.normal(size=(n, h, w, ci)), jnp.float32)
  wt = jnp.zeros((*kernel, ci, co), jnp.float32)
  y = jax.eval_shape(lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=DN), x, wt)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  assert native_kernels.supports(x, wt, strides, padding, dimension_numbers=DN)
  fn = jax.jit(lambda x, dy: native_kernels.filter_grad(
      x, dy, wt.shape, strides, padding))
  assert native_kernels.TARGET in fn.lower(x, dy).as_text()
  ours = fn(x, dy)
  ref = _lax_filter_grad(x, wt, dy, strides, padding)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * scale)


def test_supports_only_what_the_kernel_computes():
  x = jnp.zeros((2, 8, 8, 4), jnp.float32)
  w = jnp.zeros((3, 3, 4, 8), jnp.float32)
  ok = lambda x, w, **kw: native_kernels.supports(
      x, w, kw.pop("strides", (1, 1)), kw.pop("padding", "SAME"),
      **{"dimension_numbers": DN, **kw})
  assert ok(x, w)
  assert not ok(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert not ok(x, w, rhs_dilation=(2, 2))
  assert not ok(x, w, lhs_dilation=(2, 1))
  assert not ok(x, jnp.zeros((3, 3, 1, 8)), feature_group_count=4)
  assert not ok(x, w, padding=((-1, 1), (1, 1)))
  assert not ok(jnp.zeros((2, 4, 8, 8)), jnp.zeros((8, 4, 3, 3)),
                dimension_numbers=("NCHW", "OIHW", "NCHW"))


def test_cache_key_follows_cpu_and_source(monkeypatch, tmp_path):
  path, cmd = native_kernels._library_path()
  assert "-march=native" in cmd and jax.ffi.include_dir() in cmd
  monkeypatch.setattr(native_kernels, "_cpu_signature", lambda: "other cpu")
  assert native_kernels._library_path()[0] != path
  monkeypatch.undo()
  source = tmp_path / "depthwise_conv.cc"
  source.write_text(native_kernels.SOURCES[1].read_text() + "\n// edited\n")
  monkeypatch.setattr(native_kernels, "SOURCES", (native_kernels.SOURCES[0], source))
  assert native_kernels._library_path()[0] != path


def _run_child(code, env_extra, tmp_path):
  env = dict(os.environ, AFFECTJAX_CACHE_DIR=str(tmp_path / "cache"), **env_extra)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=300)


_FALLBACK_CHILD = """
    import functools, jax, jax.numpy as jnp, numpy as np
    from affectjax.models import layers, native_kernels
    x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 5)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    loss = lambda conv, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=dn)))
    ours = jax.jit(jax.grad(functools.partial(loss, layers.conv_cpu_filter_grad)))
    ref = jax.grad(functools.partial(loss, jax.lax.conv_general_dilated))(w)
    np.testing.assert_allclose(ours(w), ref, rtol=1e-4, atol=1e-4)
    assert native_kernels.TARGET not in ours.lower(w).as_text()
    print("available", native_kernels.available())
    print("reason", native_kernels.unavailable_reason().splitlines()[0])
"""


def test_failed_build_falls_back_to_xla_with_a_warning(tmp_path):
  # A "compiler" that answers --version and fails every build.
  cxx = tmp_path / "broken-cxx"
  cxx.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\n"
                 "echo 'broken-cxx: error: cannot compile' >&2; exit 1\n")
  cxx.chmod(cxx.stat().st_mode | stat.S_IEXEC)
  done = _run_child(_FALLBACK_CHILD, {"CXX": str(cxx)}, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "available False" in done.stdout
  assert "building the native kernels failed" in done.stdout
  assert "native CPU kernels are off" in done.stderr
  assert "broken-cxx: error: cannot compile" in done.stderr
  assert not list((tmp_path / "cache" / "native").glob("*"))  # No partial file.


def test_opt_out_keeps_xla(tmp_path):
  done = _run_child(_FALLBACK_CHILD, {native_kernels.OPT_OUT: "0"}, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "available False" in done.stdout
  assert f"reason {native_kernels.OPT_OUT}=0" in done.stdout
  assert not (tmp_path / "cache" / "native").exists()  # Nothing was built.


@pytest.mark.parametrize("native", [True, False])
def test_conv_cpu_filter_grad_uses_the_kernel_on_the_cpu(native):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 9, 8, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32)

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, (2, 1), "SAME", dimension_numbers=DN)))

  ours = jax.jit(jax.grad(lambda x, w: loss(
      lambda *a, **k: layers.conv_cpu_filter_grad(*a, native=native, **k), x, w),
      argnums=(0, 1)))
  ref = jax.grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w),
                 argnums=(0, 1))(x, w)
  for a, b in zip(ours(x, w), ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert (native_kernels.TARGET in ours.lower(x, w).as_text()) == native


def test_forward_passes_never_build_the_kernel(tmp_path):
  # evaluate / predict / export trace only forward passes: no compiler run.
  code = """
      import jax, jax.numpy as jnp
      from flax import nnx
      from affectjax import models
      from affectjax.models import native_kernels
      model = models.create("custom_cnn", rngs=nnx.Rngs(0), widths=(4, 8),
                            head_hidden=8, dropout=0.0, impl="fused")
      x = jnp.ones((12, 16, 16, 3), jnp.float32)
      nnx.jit(lambda m, x: m(x)[0])(model, x)
      print("after forward", "ok" in native_kernels._state)
      grads = nnx.grad(lambda m: jnp.sum(m(x, train=True)[0]))(model)
      print("after backward", native_kernels._state.get("ok"))
  """
  done = _run_child(code, {}, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "after forward False" in done.stdout
  assert "after backward True" in done.stdout
  assert len(list((tmp_path / "cache" / "native").glob("*.so"))) == 1


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 9, 8, 37), (3, 3), (1, 1), "SAME"),     # 2 vectors + a 5-channel tail
    ((2, 11, 10, 32), (5, 5), (2, 2), "SAME"),   # stride 2: XLA's input gradient
    ((3, 7, 9, 20), (5, 5), (1, 1), ((1, 3), (2, 2))),
    ((2, 8, 8, 16), (7, 7), (1, 1), "SAME"),     # neither 3x3 nor 5x5: generic taps
    ((2, 9, 7, 17), (3, 5), (2, 1), "VALID"),
])
def test_depthwise_kernels_equal_lax(shape, kernel, strides, padding):
  """The native depthwise forward, input and filter gradients (training only)."""
  from affectjax.models import depthwise  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(shape[-1])
  c = shape[-1]
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, 1, c)), jnp.float32)

  def run(fn):
    conv = lambda x, w: fn(x, w, strides, padding, dimension_numbers=DN,
                           feature_group_count=c)
    y, vjp = jax.vjp(conv, x, w)
    g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    return (y, *vjp(g))

  ours = jax.jit(lambda x, w: run(depthwise.conv_general_dilated))
  text = ours.lower(x, w).as_text()
  assert native_kernels.DEPTHWISE_TARGET in text
  assert native_kernels.DEPTHWISE_GRAD_TARGET in text
  # Stride 1: the input gradient is the forward kernel too (two calls).
  assert text.count(f"@{native_kernels.DEPTHWISE_TARGET}(") == (
      2 if strides == (1, 1) else 1)
  ref = run(jax.lax.conv_general_dilated)
  for a, b in zip(ours(x, w), ref):  # value, input gradient, filter gradient
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # Inference (and jax.export) traces the primal: XLA's ops, no custom call.
  primal = jax.jit(lambda x, w: depthwise.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=DN, feature_group_count=c))
  assert "affectjax_" not in primal.lower(x, w).as_text()


def test_kernels_stay_off_on_other_backends(monkeypatch):
  # Measured on XLA:CPU only; a GPU or TPU keeps lax's / XLA's ops.
  x = jnp.zeros((2, 8, 8, 16), jnp.float32)
  dense, depthwise_w = jnp.zeros((3, 3, 16, 16)), jnp.zeros((3, 3, 1, 16))
  assert native_kernels.supports(x, dense, (1, 1), "SAME", dimension_numbers=DN)
  assert native_kernels.depthwise_supported(x, depthwise_w)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not native_kernels.supports(x, dense, (1, 1), "SAME", dimension_numbers=DN)
  assert not native_kernels.depthwise_supported(x, depthwise_w)


@pytest.mark.slow
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_kernels_on_narrower_vectors(tmp_path, march):
  """The AVX2 (8-float) and SSE (4-float) builds a CPU without AVX-512 gets
  from -march=native (AMD EPYC before Zen 4), built here with -march=<march>."""
  if platform.machine() != "x86_64":
    pytest.fail("this test builds x86-64 variants; run it on x86-64")
  code = f"""
      import jax, jax.numpy as jnp, numpy as np
      from affectjax.models import depthwise, native_kernels
      native_kernels.CXX_FLAGS = tuple(
          "-march={march}" if f == "-march=native" else f
          for f in native_kernels.CXX_FLAGS)
      assert native_kernels.available(), native_kernels.unavailable_reason()
      dn = ("NHWC", "HWIO", "NHWC")
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(3, 9, 10, 21)), jnp.float32)
      for s in ((1, 1), (2, 1)):
        w = jnp.zeros((3, 3, 21, 37), jnp.float32)
        y = jax.eval_shape(lambda x, w: jax.lax.conv_general_dilated(
            x, w, s, "SAME", dimension_numbers=dn), x, w)
        dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        ref = jax.vjp(lambda w: jax.lax.conv_general_dilated(
            x, w, s, "SAME", dimension_numbers=dn), w)[1](dy)[0]
        ours = jax.jit(lambda x, dy: native_kernels.filter_grad(
            x, dy, w.shape, s, "SAME"))(x, dy)
        np.testing.assert_allclose(ours, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
        wd = jnp.asarray(rng.normal(size=(5, 5, 1, 21)), jnp.float32)
        conv = lambda fn: (lambda x, w: fn(x, w, s, "SAME", dimension_numbers=dn,
                                           feature_group_count=21))
        ours = jax.jit(lambda x, w: jax.value_and_grad(
            lambda x, w: jnp.sum(jnp.sin(conv(depthwise.conv_general_dilated)(x, w))),
            argnums=(0, 1))(x, w))(x, wd)
        ref = jax.value_and_grad(
            lambda x, w: jnp.sum(jnp.sin(conv(jax.lax.conv_general_dilated)(x, w))),
            argnums=(0, 1))(x, wd)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
          np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
      print("built", native_kernels._state["path"])
  """
  done = _run_child(code, {}, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "built" in done.stdout
