"""The serving function as an ONNX model (``--format=onnx``), via jax2onnx.

The model that ONNX Runtime runs is the same jaxpr ``jax.export`` lowers (the
uint8 -> resize -> normalize -> backbone -> head function of
``scoring.predict_images``, weights as constants, batch size symbolic), handed
to jax2onnx one JAX primitive at a time. Two of its primitives are rewritten
first into equivalent ones, because jax2onnx 0.13 lowers them wrongly:

* ``reduce_window_max`` (max pooling, NHWC) becomes an ONNX ``MaxPool`` over
  all four axes, which ONNX Runtime refuses ("Unsupported pooling size"): it
  is computed here as the maximum of the window's strided slices (exact).
* ``pad`` with a symbolic batch size fails in jax2onnx's shape bookkeeping: it
  is computed as a concatenation with constant blocks (exact).

The model is first traced to a jaxpr with jax itself, so jax2onnx's own
monkey-patches of Flax functions (whose ``nnx.max_pool`` patch rejects the
positional window argument) never see affectjax's code. Control-flow-free
call primitives (``jit``, ``custom_jvp_call``) are inlined.

Needs the ``onnx`` extra: ``pip install -e '.[onnx]'`` (jax2onnx, onnx,
onnxruntime); ``./launch.sh export --format=onnx`` installs it.
"""
from __future__ import annotations

import itertools
import logging as py_logging
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

MODEL_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "valence_arousal")
OPSET = 21


def _max_pool_by_slices(x, *, window_dimensions, window_strides, padding,
                        base_dilation, window_dilation):
  """``reduce_window_max`` as the max over the window's strided slices."""
  if any(d != 1 for d in tuple(base_dilation) + tuple(window_dilation)):
    raise NotImplementedError("dilated max pooling has no ONNX rewrite here")
  if any(lo or hi for lo, hi in padding):
    x = _pad_by_concat(x, jnp.array(-jnp.inf, x.dtype),
                       [(lo, hi, 0) for lo, hi in padding])
  out = None
  for offset in itertools.product(*(range(w) for w in window_dimensions)):
    limit = [o + (n - w) // s * s + 1 for o, n, w, s in zip(
        offset, x.shape, window_dimensions, window_strides)]
    part = lax.slice(x, offset, limit, window_strides)
    out = part if out is None else jnp.maximum(out, part)
  return out


def _pad_by_concat(x, value, padding_config):
  """``lax.pad`` (no interior or negative padding) as concatenations."""
  for axis, (lo, hi, interior) in enumerate(padding_config):
    if interior or lo < 0 or hi < 0:
      raise NotImplementedError(
          f"pad {padding_config} (interior or negative) has no ONNX rewrite")
    pieces = []
    for n in (lo, hi):
      shape = list(x.shape)
      shape[axis] = n
      pieces.append(lax.broadcast_in_dim(
          jnp.asarray(value, x.dtype), tuple(shape), ()) if n else None)
    seq = [p for p in (pieces[0], x, pieces[1]) if p is not None]
    if len(seq) > 1:
      x = lax.concatenate(seq, axis)
  return x


def _eval(jaxpr, consts, *args) -> list[Any]:
  """``jax.core.eval_jaxpr`` with the rewrites of the module docstring."""
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "reduce_window_max":
      outs = [_max_pool_by_slices(ins[0], **eqn.params)]
    elif name == "pad":
      outs = [_pad_by_concat(ins[0], ins[1], eqn.params["padding_config"])]
    elif name in ("jit", "pjit"):
      sub = eqn.params["jaxpr"]
      outs = _eval(sub.jaxpr, sub.consts, *ins)
    elif name == "custom_jvp_call":  # Inference: the primal function.
      sub = eqn.params["call_jaxpr"]
      outs = _eval(sub.jaxpr, sub.consts, *ins)
    else:
      outs = eqn.primitive.bind(*ins,
                                **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def convert(fn, *, input_size: int, model_name: str = "affectjax"):
  """uint8 (batch, S, S, 3) -> outputs function ``fn`` -> onnx.ModelProto.

  The batch size stays symbolic (``batch`` in the ONNX input shape).
  """
  try:
    from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # A ValueError: the tools print it as one line.
    raise ValueError(
        "--format=onnx needs jax2onnx and onnxruntime: `pip install -e "
        "'.[onnx]'` (./launch.sh export --format=onnx installs them).") from e
  batch, = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, input_size, input_size, 3), jnp.uint8)
  closed = jax.make_jaxpr(fn)(spec)

  def flat(images):
    return tuple(_eval(closed.jaxpr, closed.consts, images))

  # jax2onnx logs a traceback per optional plugin its jax version lacks
  # (e.g. dm_pix's); they are not used here.
  # (onnx_ir warns about the shapes dropped below.)
  loggers = [py_logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(py_logging.ERROR)
  try:
    model = to_onnx(flat, [spec], model_name=model_name, opset=OPSET,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
  # jax2onnx annotates some intermediate shapes wrongly (a broadcast's
  # (1, N) for (M, N)); ONNX Runtime warns and re-infers them, so drop them.
  del model.graph.value_info[:]
  return model


def op_types(model) -> list[str]:
  """The ONNX op types the model uses (sorted), for signature.json."""
  return sorted({n.op_type for n in model.graph.node})


def converter_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version("jax2onnx")
