"""`MultitaskModel`: a backbone plus the multitask head, with the call contract the trainer uses."""
from __future__ import annotations

import jax
from flax import nnx


class MultitaskModel(nnx.Module):
  """Backbone + head. Top-level attributes `.backbone` and `.head` are the optimizer groups.

  BatchNorm in the backbone uses batch statistics (and updates its moving
  averages) only when `train and train_backbone`; with a frozen backbone it
  runs in inference mode and its output is gradient-stopped, so a frozen
  backbone costs no backward pass.
  """

  def __init__(self, backbone: nnx.Module, head: nnx.Module, name: str):
    self.backbone = backbone
    self.head = head
    self.name = name

  def preprocess(self, images_uint8: jax.Array) -> jax.Array:
    """Exactly the input normalization this backbone's weights expect (jit-able)."""
    return self.backbone.preprocess(images_uint8)

  def features(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Backbone feature map (B, h, w, C) of an already preprocessed batch."""
    return self.backbone(x, train=train, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False,
               train_backbone: bool = True, rngs: nnx.Rngs | None = None):
    """Returns (logits float32 [B, classes], va float32 [B, 2] in [-1, 1])."""
    backbone_train = train and train_backbone
    f = self.backbone(x, train=backbone_train, rngs=rngs)
    if train and not train_backbone:
      f = jax.lax.stop_gradient(f)
    return self.head(f, train=train, rngs=rngs)
