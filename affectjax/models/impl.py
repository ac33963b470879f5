"""`impl` (config.model.kwargs.impl) of every model: how the same layers are computed.

  'plain'  the textbook formulation: lax's convolutions and pools, autodiff
           through everything.
  'fused'  the CPU-fast formulation of the same parameters and values
           (docs/MODELS.md lists, per model, what changes; the gradients
           equal 'plain's within float32 rounding).
  'auto'   (default) 'fused' when JAX's default backend is the CPU, else
           'plain': the fused formulations were measured on XLA:CPU only
           (docs/BENCHMARKS.md), so GPUs and TPUs keep lax's.

Each model's module says what its 'fused' changes.
"""
from __future__ import annotations

import jax

IMPLS = ("auto", "plain", "fused")


def resolve(model: str, impl: str) -> str:
  """'auto' -> 'fused' on the CPU backend, 'plain' elsewhere; checks the name."""
  if impl not in IMPLS:
    raise ValueError(f"{model} impl={impl!r} (config.model.kwargs.impl): "
                     f"use one of {', '.join(IMPLS)}.")
  if impl == "auto":
    return "fused" if jax.default_backend() == "cpu" else "plain"
  return impl
