"""Native CPU kernels (XLA FFI custom calls) for what XLA:CPU runs slowly in
training: a dense convolution's filter gradient, and EfficientNet's
depthwise convolution (forward and filter gradient).

XLA:CPU computes a convolution's filter gradient as another convolution,
whose "kernel" is the whole output map and whose contraction is over the
images; Eigen blocks that shape badly, and it was what kept the dense
convnets' CPU train step below PyTorch's (docs/BENCHMARKS.md, "The filter
gradient, layer by layer": 96 ms in chunks of 8 images against oneDNN's 52
for the custom CNN's eight convolutions). `csrc/conv_filter_grad.cc`
computes it as the GEMM it is (`filter_grad`): cache-sized blocks of output
rows, a register-blocked micro-kernel over each run of output columns (no
im2col copy), the images or output channels split between XLA's CPU
threads.

`csrc/depthwise_conv.cc` computes a depthwise convolution
(`depthwise_conv`) and its filter gradient (`depthwise_filter_grad`)
reading the arrays in place; XLA runs `depthwise.py`'s shifted
multiply-adds through a padded copy and per-tap slices (the forward 1.2-2.7x
the kernel's time). `depthwise.py` calls them from its `custom_vjp` rules,
which only differentiation uses: inference and `jax.export` keep XLA's ops,
so an exported model carries no custom call.

The kernels are C++ built on first use, like PyTorch's `cpp_extension.load`:
`g++ -O3 -march=native` (``$CXX`` if set) against the XLA FFI headers that
jaxlib ships (`jax.ffi.include_dir()`), into
``~/.cache/affectjax/native`` (``$AFFECTJAX_CACHE_DIR/native`` when set),
under a name that hashes the sources, jaxlib's version, the compiler and
the CPU's model and flags, so one home directory shared by different CPUs
or jaxlibs keeps one build each. The build is written to a temporary name
and renamed, so concurrent processes never load a partial file. Without a
compiler, or where the build fails, `available()` says why (logged once)
and the callers keep XLA's formulations.

``AFFECTJAX_NATIVE_KERNELS=0`` turns them off (XLA's formulations
everywhere), for comparisons (`benchmarks/train_bench.py
--jax_impls=fused@nonative`). They run on the CPU backend only, for
float32 NHWC inputs (`supports`, `depthwise_supported`).

A dense forward kernel of the same design was tried and left out: with the
filter panel blocked for L1 it stayed 0-40% slower than Eigen's forward
convolution on VGG16's layers (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from affectjax import cache_location

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("conv_filter_grad.cc", "depthwise_conv.cc"))
HEADERS = (Path(__file__).with_name("csrc") / "cpu_kernel.h",)
# XLA custom-call target -> the handler symbol in the library.
TARGET = "affectjax_conv_filter_grad"
DEPTHWISE_TARGET = "affectjax_depthwise_conv"
DEPTHWISE_GRAD_TARGET = "affectjax_depthwise_filter_grad"
SYMBOLS = {TARGET: "AffectjaxConvFilterGrad",
           DEPTHWISE_TARGET: "AffectjaxDepthwiseConv",
           DEPTHWISE_GRAD_TARGET: "AffectjaxDepthwiseFilterGrad"}
OPT_OUT = "AFFECTJAX_NATIVE_KERNELS"
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
             "-fno-math-errno")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
  return Path(cache_location.root()) / "native"


def _cpu_signature() -> str:
  """The CPU's model name and feature flags (-march=native depends on them)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = [l for l in f.read().splitlines()
               if l.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> list[str]:
  return (os.environ.get("CXX") or "g++").split()


def _library_path() -> tuple[Path, list[str]]:
  """Where this source, jaxlib, compiler and CPU's build goes, and its command."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  cxx = _compiler()
  version = subprocess.run(cxx + ["--version"], capture_output=True,
                           text=True, check=True).stdout
  digest = hashlib.sha256()
  for part in (*(src.read_bytes() for src in SOURCES + HEADERS),
               jaxlib.__version__.encode(),
               version.encode(), _cpu_signature().encode(),
               " ".join(CXX_FLAGS).encode()):
    digest.update(part)
    digest.update(b"\0")
  path = _cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
  cmd = cxx + list(CXX_FLAGS) + ["-isystem", jax.ffi.include_dir(),
                                 *map(str, SOURCES), "-o"]
  return path, cmd


def build() -> Path:
  """Compiles the kernel unless this machine's build exists; returns its path.

  Raises RuntimeError naming the command and the compiler's message when the
  build fails, and OSError / FileNotFoundError when there is no compiler.
  """
  path, cmd = _library_path()
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp",
                             dir=path.parent)
  os.close(fd)
  logging.info("Compiling the native CPU kernels (once per machine and "
               "jaxlib, about 10 s): %s", " ".join(cmd + [str(path)]))
  try:
    done = subprocess.run(cmd + [tmp], capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(
          f"building the native kernels failed ({' '.join(cmd + [tmp])}):\n"
          f"{done.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def _opted_out() -> bool:
  return os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no")


def available() -> bool:
  """Whether the kernels are built, loaded and registered with XLA:CPU (once).

  False when ``AFFECTJAX_NATIVE_KERNELS=0``, or when the build or load
  failed; the reason is logged once and kept in `unavailable_reason()`.
  """
  with _lock:
    if "ok" in _state:
      return bool(_state["ok"])
    if _opted_out():
      _state.update(ok=False, reason=f"{OPT_OUT}={os.environ[OPT_OUT]}")
      return False
    try:
      path = build()
      lib = ctypes.cdll.LoadLibrary(str(path))
      for target, symbol in SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError,
            AttributeError) as e:
      _state.update(ok=False, reason=str(e))
      logging.warning(
          "The native CPU kernels are off (%s); convolutions keep XLA's "
          "filter gradients and depthwise convolutions, which train the "
          "models 7-35%% slower on the CPU (docs/BENCHMARKS.md). They need "
          "a C++17 compiler (g++, or $CXX).", e)
      return False
    _state.update(ok=True, reason="", path=str(path))
    logging.info("Native CPU kernels: %s", path)
    return True


def unavailable_reason() -> str:
  """Why `available()` returned False ('' when it is on or not yet asked)."""
  return str(_state.get("reason", ""))


def supports(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
             batch_group_count=1) -> bool:
  """Whether `filter_grad` can compute this convolution's filter gradient.

  The CPU backend, float32 NHWC input and HWIO kernel of static shapes, no
  dilation, one group, no negative padding, and the kernel not turned off
  or known to have failed. It does not build the kernel: a forward pass
  (evaluate, predict, export) never needs it, so the build waits for the
  first backward pass, whose caller asks `available()`. The arguments are
  `lax.conv_general_dilated`'s.
  """
  if jax.default_backend() != "cpu":
    return False
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return False
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  if not all(isinstance(d, int) for d in (*lhs.shape, *rhs.shape)):
    return False
  if any(d is not None and any(v != 1 for v in d)
         for d in (lhs_dilation, rhs_dilation)):
    return False
  if feature_group_count != 1 or batch_group_count != 1:
    return False
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1),
                                                 (0, 3, 1, 2)):
    return False  # not NHWC / HWIO / NHWC
  pads = explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
  if any(v < 0 for pair in pads for v in pair):
    return False
  return not _opted_out() and _state.get("ok", True)


def explicit_padding(lhs_shape, rhs_shape, window_strides, padding):
  """lax's padding argument ('SAME', 'VALID', 'SAME_LOWER' or pairs) as pairs."""
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2],
                                   window_strides, padding)
  return [tuple(p) for p in padding]


def filter_grad(x, dy, kernel_shape, window_strides, padding):
  """dL/dw (float32, `kernel_shape` HWIO) of conv(x, w) given dL/dy = `dy`.

  `x` is the NHWC input, `dy` the NHWC output gradient; `padding` lax's
  (a string or (low, high) pairs). Equal to `jax.vjp` of
  `lax.conv_general_dilated` within float32 rounding (another summation
  order). Call only where `supports` said yes.
  """
  (top, _), (left, _) = explicit_padding(x.shape, kernel_shape,
                                         window_strides, padding)
  if top < 0 or left < 0:
    raise ValueError(f"filter_grad: negative padding {padding} is not supported.")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(tuple(kernel_shape),
                                                       jnp.float32))
  return call(x, dy.astype(jnp.float32),
              stride_h=np.int64(window_strides[0]),
              stride_w=np.int64(window_strides[1]),
              pad_top=np.int64(top), pad_left=np.int64(left))


def depthwise_supported(x, w) -> bool:
  """Whether `depthwise_conv` computes this depthwise convolution.

  The CPU backend, float32 of static shapes, a (kh, kw, 1, C) filter, and
  the kernels not turned off or known to have failed (`supports`' rule:
  the caller builds them with `available()` when it traces a backward pass).
  """
  return (jax.default_backend() == "cpu" and x.dtype == jnp.float32
          and w.dtype == jnp.float32 and x.ndim == 4 and w.ndim == 4
          and all(isinstance(d, int) for d in (*x.shape, *w.shape))
          and w.shape[2] == 1 and w.shape[3] == x.shape[3]
          and not _opted_out() and _state.get("ok", True))


def depthwise_conv(x, w, strides, padding, out_shape):
  """The depthwise convolution of NHWC `x` with (kh, kw, 1, C) `w`.

  `padding` is explicit ((top, bottom), (left, right)); `out_shape` the
  NHWC output's. Equal to `depthwise.depthwise_conv`
  within float32 rounding. Call where `depthwise_supported` and
  `available()` said yes.
  """
  (top, _), (left, _) = padding
  call = jax.ffi.ffi_call(DEPTHWISE_TARGET,
                          jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32))
  return call(x, w.reshape(w.shape[0], w.shape[1], w.shape[3]),
              sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              pt=np.int64(top), pl=np.int64(left))


def depthwise_filter_grad(x, dy, kernel_shape, strides, padding):
  """dL/dw ((kh, kw, 1, C), float32) of the depthwise convolution of `x`
  given dL/dy = `dy` (both NHWC float32); `padding` explicit. Equal to
  `depthwise._filter_grad` within float32 rounding."""
  kh, kw, _, c = kernel_shape
  (top, _), (left, _) = padding
  call = jax.ffi.ffi_call(DEPTHWISE_GRAD_TARGET,
                          jax.ShapeDtypeStruct((kh, kw, c), jnp.float32))
  return call(x, dy, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
              pt=np.int64(top), pl=np.int64(left)).reshape(kh, kw, 1, c)
