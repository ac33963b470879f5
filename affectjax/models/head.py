"""The multitask head shared by every backbone: expression logits plus valence/arousal.

Global average pooling, dropout, an optional hidden ReLU layer, then two linear
outputs: `num_classes` expression logits and 2 values squashed by tanh into
[-1, 1] (order: valence, arousal). Outputs are float32 whatever the compute
dtype, so losses and metrics never see bfloat16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MultitaskHead(nnx.Module):
  """GAP -> dropout -> [Dense(hidden) -> ReLU -> dropout] -> (logits, tanh(va))."""

  def __init__(self, in_features: int, *, num_classes: int = 8,
               hidden: int = 256, dropout: float = 0.3, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"head dropout must be in [0, 1), got {dropout}.")
    self.dtype = dtype
    # No RNG stream is stored: the dropout key comes from the call-time rngs.
    self.dropout = nnx.Dropout(dropout)
    dense = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32,
                                    rngs=rngs)
    self.hidden = dense(in_features, hidden) if hidden else None
    out_features = hidden or in_features
    self.expression = dense(out_features, num_classes)
    self.valence_arousal = dense(out_features, 2)

  def __call__(self, features: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None):
    # Pool in float32: a bf16 sum over h*w positions loses digits.
    x = jnp.mean(features.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    deterministic = not train or self.dropout.rate == 0.0
    if not deterministic and rngs is None:
      raise ValueError("head dropout is active (train=True) but no rngs were "
                       "passed; call the model with rngs=nnx.Rngs(dropout=key).")
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    if self.hidden is not None:
      x = nnx.relu(self.hidden(x))
      x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    logits = self.expression(x).astype(jnp.float32)
    va = jnp.tanh(self.valence_arousal(x).astype(jnp.float32))
    return logits, va
