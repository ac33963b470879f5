"""Optimizer, learning-rate schedule and transfer-learning modes.

Parameters fall into two groups by the first element of their path in the
model: 'backbone' and 'head' (`MultitaskModel` has exactly these two
children). `config.transfer.mode` decides how each group trains:

  full       both groups train from step 0; the backbone at
             `backbone_lr_multiplier` x the learning rate.
  frozen     only the head trains; backbone updates are exactly zero and the
             trainer runs the backbone's BatchNorm in inference mode
             (`backbone_trainable` is False).
  two_phase  the head trains from step 0; the backbone is frozen until
             `unfreeze_step`, then trains with its own schedule (warmup from 0,
             then the main schedule's shape over the remaining steps) at
             `backbone_lr_multiplier` x the learning rate. Its optimizer state
             (momentum, Adam moments and step count) stays untouched while it
             is frozen, so it starts clean.

Weight decay applies to kernels only (ndim >= 2), not to biases or BatchNorm
scale/shift. Gradient clipping by global norm runs before everything else.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ("backbone", "head")
MODES = ("full", "frozen", "two_phase")


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_groups(params):
  """Pytree of 'backbone'/'head' labels with the structure of `params`."""
  def label(path, _):
    group = _key_name(path[0]) if path else ""
    if group not in GROUPS:
      raise ValueError(
          f"Parameter {'/'.join(_key_name(p) for p in path)!r} is in neither "
          f"the backbone nor the head; optim.create expects the params of a "
          "MultitaskModel (first path element 'backbone' or 'head').")
    return group
  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def schedule(config, total_steps: int | None = None) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to 0 or a constant, per config.optimizer."""
  opt = config.optimizer
  total = int(config.total_steps if total_steps is None else total_steps)
  lr = float(opt.learning_rate)
  warmup = max(0, min(int(opt.warmup_steps), total))
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=0.0)
  if opt.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup)
  raise ValueError(f"Unknown config.optimizer.schedule {opt.schedule!r}; "
                   "use 'cosine' or 'constant'.")


def _base_optimizer(config, learning_rate) -> optax.GradientTransformation:
  opt = config.optimizer
  wd = float(opt.weight_decay)
  if opt.name == "adamw":
    return optax.adamw(learning_rate, weight_decay=wd, mask=_decay_mask)
  if opt.name == "sgd":
    # Decay before the momentum, like classic SGD with L2 (Keras/Caffe style).
    return optax.chain(
        optax.masked(optax.add_decayed_weights(wd), _decay_mask),
        optax.sgd(learning_rate, momentum=float(opt.momentum) or None))
  raise ValueError(f"Unknown config.optimizer.name {opt.name!r}; use 'adamw' or 'sgd'.")


class _GateState(NamedTuple):
  count: jax.Array
  inner: optax.OptState


def _start_at(step: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Zero updates, and a frozen inner state, for the first `step` updates; then `inner`."""
  def init(params):
    return _GateState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    active = state.count >= step
    new_updates = jax.tree_util.tree_map(
        lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree_util.tree_map(
        lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
    count = jnp.minimum(state.count + 1, jnp.int32(step))  # Saturates; no overflow.
    return new_updates, _GateState(count, new_inner)

  return optax.GradientTransformation(init, update)


def create(config, params=None) -> optax.GradientTransformation:
  """The full optimizer for `config`: clipping, schedule, decay and transfer mode.

  `params` (the nnx.Param state) is only used to validate the parameter
  grouping early; labels are recomputed from the params at init/update.
  """
  mode = config.transfer.mode
  if mode not in MODES:
    raise ValueError(f"Unknown config.transfer.mode {mode!r}; use one of {MODES}.")
  if params is not None:
    param_groups(params)
  mult = float(config.transfer.backbone_lr_multiplier)
  head_lr = schedule(config)

  head_tx = _base_optimizer(config, head_lr)
  if mode == "full":
    backbone_tx = _base_optimizer(config, lambda s: mult * head_lr(s))
  elif mode == "frozen":
    backbone_tx = optax.set_to_zero()
  else:
    start = int(config.transfer.unfreeze_step)
    if not 0 <= start < int(config.total_steps):
      raise ValueError(
          f"config.transfer.unfreeze_step={start} must be in [0, total_steps="
          f"{config.total_steps}) for mode 'two_phase'.")
    backbone_lr = schedule(config, int(config.total_steps) - start)
    backbone_tx = _start_at(
        start, _base_optimizer(config, lambda s: mult * backbone_lr(s)))

  tx = optax.multi_transform({"backbone": backbone_tx, "head": head_tx},
                             param_groups)
  clip = float(config.optimizer.grad_clip_norm)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx


def backbone_trainable(config, step: int) -> bool:
  """Whether the backbone trains at `step` (the trainer's static `train_backbone`)."""
  mode = config.transfer.mode
  if mode == "full":
    return True
  if mode == "frozen":
    return False
  if mode == "two_phase":
    return int(step) >= int(config.transfer.unfreeze_step)
  raise ValueError(f"Unknown config.transfer.mode {mode!r}; use one of {MODES}.")
