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

Around the optimizer (the trainer calls these; the optax state is the same
with or without them, so they can be switched on or off on resume):
  value_and_grad  SAM (`config.optimizer.sam_rho`): the gradient at the
                  adversarially perturbed weights, in place of
                  `jax.value_and_grad`.
  ema_update      exponential moving average of the weights and BatchNorm
                  statistics (`config.ema_decay`), for evaluation.
  learning_rate   the head's learning rate at a step, for logging.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def schedule(config, total_steps=None) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to 0 or a constant, per config.optimizer.

  ``total_steps`` (default ``config.total_steps``) may be a traced integer
  (the time budget's plan reaches the compiled step as an argument): the
  schedule is then the same arithmetic in ``jnp`` (``_traced_schedule``),
  with no Python branch on the length.
  """
  opt = config.optimizer
  if total_steps is not None and not isinstance(total_steps, (int, np.integer)):
    return _traced_schedule(config, total_steps)
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


def _traced_schedule(config, total_steps) -> optax.Schedule:
  """``schedule`` for a traced ``total_steps``: optax's formulas, step for step.

  optax's warmup-cosine is ``join_schedules([linear(0, lr, W), cosine(lr,
  D - W)], [W])`` with ``W = min(warmup, total)`` and ``D = max(total, W +
  1)``; its constructors branch in Python on the lengths, so they cannot
  take a traced one. The same expressions here agree with them to float32
  rounding (tests/test_optim.py compares every step).
  """
  opt = config.optimizer
  if opt.schedule not in ("cosine", "constant"):
    raise ValueError(f"Unknown config.optimizer.schedule {opt.schedule!r}; "
                     "use 'cosine' or 'constant'.")
  lr = float(opt.learning_rate)
  total = jnp.asarray(total_steps, jnp.float32)
  warmup = jnp.clip(jnp.float32(max(0, int(opt.warmup_steps))), 0.0, total)

  def warm(count):
    c = jnp.clip(count, 0.0, warmup)
    frac = 1.0 - c / jnp.maximum(warmup, 1.0)
    # linear_schedule with no steps is its constant init value, 0.
    return jnp.where(warmup > 0, (0.0 - lr) * frac + lr, 0.0)

  def fn(count):
    count = jnp.asarray(count, jnp.float32)
    if opt.schedule == "constant":
      return jnp.where(count < warmup, warm(count), lr)
    decay = jnp.maximum(total, warmup + 1.0) - warmup
    c = jnp.minimum(count - warmup, decay)
    cosine = lr * (0.5 * (1 + jnp.cos(jnp.pi * c / decay)))
    return jnp.where(count < warmup, warm(count), cosine)

  return fn


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
    # Saturates; no overflow. `step` may be traced (a time budget's plan).
    count = jnp.minimum(state.count + 1, jnp.asarray(step, jnp.int32))
    return new_updates, _GateState(count, new_inner)

  return optax.GradientTransformation(init, update)


def create(config, params=None, *, total_steps=None,
           unfreeze_step=None) -> optax.GradientTransformation:
  """The full optimizer for `config`: clipping, schedule, decay and transfer mode.

  `params` (the nnx.Param state) is only used to validate the parameter
  grouping early; labels are recomputed from the params at init/update.
  `total_steps` and `unfreeze_step` default to the config's; the trainer
  passes traced ones under a time budget (`affectjax.time_budget`), so the
  compiled step takes the plan's lengths as arguments. The optimizer
  state's structure does not depend on them.
  """
  mode = config.transfer.mode
  if mode not in MODES:
    raise ValueError(f"Unknown config.transfer.mode {mode!r}; use one of {MODES}.")
  if params is not None:
    param_groups(params)
  mult = float(config.transfer.backbone_lr_multiplier)
  total = config.total_steps if total_steps is None else total_steps
  head_lr = schedule(config, total)

  head_tx = _base_optimizer(config, head_lr)
  if mode == "full":
    backbone_tx = _base_optimizer(config, lambda s: mult * head_lr(s))
  elif mode == "frozen":
    backbone_tx = optax.set_to_zero()
  else:
    start = (config.transfer.unfreeze_step if unfreeze_step is None
             else unfreeze_step)
    if isinstance(start, (int, np.integer)) and isinstance(
        total, (int, np.integer)) and not 0 <= start < total:
      raise ValueError(
          f"config.transfer.unfreeze_step={start} must be in [0, total_steps="
          f"{total}) for mode 'two_phase'.")
    backbone_lr = schedule(config, total - start)
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


# --------------------------------------------------------------------------
# SAM, EMA, and the learning rate for logging.
# --------------------------------------------------------------------------
def value_and_grad(loss_fn, config, *, train_backbone: bool = True):
  """`jax.value_and_grad(loss_fn, has_aux=True)`, or its SAM version.

  With `config.optimizer.sam_rho` = 0 this IS `jax.value_and_grad(loss_fn,
  has_aux=True)`. With rho > 0 the returned function, called as
  `fn(params, *args)`, does SAM's two passes (Foret et al. 2021, and
  HSEmotion / POSTER++ / DDAMFN's SAM with Adam):

    (loss, aux), g = value_and_grad(loss_fn)(params)      # pass 1
    eps = rho * g / ||g||                                 # global L2 norm
    g_sam = grad(loss_fn)(params + eps)                   # pass 2
    returns (loss, aux), g_sam

  and the configured optimizer (clipping, schedule, transfer groups) then
  steps with g_sam from `params`. The norm is over the whole global batch's
  gradient (no per-device m-sharpness), so 1 device == N devices.

  Loss and aux come from pass 1, at the real weights. The trainer should
  keep pass 1's BatchNorm statistics (its `new_rest`): they describe the
  weights being trained; pass 2's describe weights that never exist, and
  keeping them too would fold two updates per step into the running
  averages. The logged loss and accuracy are likewise those of the real
  weights. Both passes see the same batch and the same dropout key (the
  trainer's loss_fn closes over them), as SAM prescribes.

  With `train_backbone=False` (the trainer's static flag: mode 'frozen', or
  'two_phase' before `unfreeze_step`) only the head is perturbed and the
  norm is the head's: sharpness is measured in the weights that train.

  Why not `optax.contrib.sam`: its default mode spends alternate calls of
  `update` on the adversarial step (so two trainer steps, two batches, per
  SAM step); its opaque mode does both passes in one `update`, but needs
  `grad_fn` threaded through our clip/multi_transform chain, cannot return
  pass 1's aux (BatchNorm statistics), and wraps the optimizer state (so a
  checkpoint with SAM would not restore without it). The hand version is
  the same arithmetic (the test checks it against optax's opaque mode) and
  leaves the optimizer untouched.

  Costs a second forward/backward pass: about 2x the step time.
  """
  rho = float(config.optimizer.sam_rho)
  if not rho >= 0.0:
    raise ValueError(f"--config.optimizer.sam_rho={rho}: must be >= 0 (0 = "
                     "plain optimizer; SAM papers use 0.05).")
  plain = jax.value_and_grad(loss_fn, has_aux=True)
  if rho == 0.0:
    return plain

  def sam_value_and_grad(params, *args, **kwargs):
    (loss, aux), grads = plain(params, *args, **kwargs)
    direction = grads if train_backbone else _head_only(grads)
    scale = rho / jnp.maximum(optax.tree.norm(direction), 1e-12)
    perturbed = jax.tree.map(lambda p, d: p + (scale * d).astype(p.dtype),
                             params, direction)
    _, sam_grads = plain(perturbed, *args, **kwargs)  # Pass 2's aux dropped.
    return (loss, aux), sam_grads

  return sam_value_and_grad


def _head_only(tree):
  """`tree` with its backbone leaves zeroed (grouping as in `param_groups`)."""
  groups = param_groups(tree)
  return jax.tree.map(lambda g, x: x if g == "head" else jnp.zeros_like(x),
                      groups, tree)


def ema_decay(decay: float, step, *, warmup: bool = True):
  """The decay used for the update at `step`: min(decay, (1+step)/(10+step)).

  The warmup is TensorFlow's `ExponentialMovingAverage(num_updates=step)`:
  early on the average follows the weights closely (0.1 at step 0, 0.5 at
  step 8, 0.9 at step 80, 0.99 at step 890, 0.999 at step 8990), so the
  initial, random weights do not linger in it for ~1/(1-decay) steps. This is
  the role of Adam-style debiasing, without dividing by 1 - decay^t (which
  needs a zero-initialized average). `warmup=False` gives timm ModelEmaV2's
  constant decay.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, new, decay: float, step, *, warmup: bool = True):
  """One EMA step over params and BatchNorm statistics (timm ModelEmaV2).

  ema <- d * ema + (1 - d) * new, with d = `ema_decay(decay, step,
  warmup=warmup)`, for every floating-point leaf (kernels, biases, BatchNorm
  scale/shift AND running mean/var, as timm averages the whole state_dict);
  any other leaf (integer counters, RNG keys in `rest`) is copied from `new`.
  Leaves keep their dtype.

  Args:
    ema: the average so far, a pytree like `new` (start it as a copy of the
      initial `{"params": params, "rest": rest}`).
    new: the weights after this step's update.
    decay: `config.ema_decay`, in [0, 1).
    step: the index of the update that produced `new` (the train state's
      step before incrementing: 0 for the first update).
    warmup: see `ema_decay`.
  """
  if not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"--config.ema_decay={decay}: must be in [0, 1) "
                     "(0 = off; typical 0.999-0.9999).")
  d = ema_decay(decay, step, warmup=warmup)

  def one(e, n):
    if not jnp.issubdtype(jnp.result_type(e), jnp.floating):
      return n
    return (d * e.astype(jnp.float32)
            + (1.0 - d) * n.astype(jnp.float32)).astype(e.dtype)

  return jax.tree.map(one, ema, new)


def learning_rate(config, step) -> float:
  """The head's learning rate at `step` (the backbone's is
  `backbone_lr_multiplier` x this in 'full' mode; 0 while frozen)."""
  return float(schedule(config)(int(step)))
