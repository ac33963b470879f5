"""The evaluation step and the evaluation pass, shared by every consumer.

The trainer calls ``evaluate`` at each evaluation; ``affectjax.evaluate``
(metrics files and plots of a checkpoint), ``affectjax.report`` and the tests
reuse it, so "the trainer's number" and "the evaluation tool's number" are
the same computation.

  make_eval_step(graphdef, config, mesh, class_weights=None, *, tta="none")
      -> jitted (state, batch) -> (out, stats), outputs replicated.
  evaluate(state, eval_fn, config, mesh, *, split="val", collect=False,
           classes=None) -> dict

Batches are uint8 (B, S, S, 3) at the prepared size S; the step resizes to
``config.image_size`` on the device (``augment.resize_images``), then applies
the model's own preprocessing. With ``tta="flip"`` the step also runs the
mirrored batch and averages logits and valence/arousal of the two passes.

``classes=7`` scores an 8-class model on the 7-class protocol (how published
AffectNet 7-class numbers are made): the Contempt logit and every Contempt
row are dropped before the metrics, so argmax runs over the other 7 logits.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affectjax import augment
from affectjax import input_pipeline
from affectjax import losses
from affectjax import metrics as metrics_lib
from affectjax import sharding

TTA_MODES = ("none", "flip")
CONTEMPT = 7  # Class id of Contempt in AffectNet's 8-class coding.


def eval_weights(state: dict, use_ema: bool = True) -> dict:
  """``{"params", "rest"}`` to evaluate: the EMA weights when the state has them."""
  if use_ema and "ema" in state:
    return state["ema"]
  return {"params": state["params"], "rest": state["rest"]}


def predict_images(graphdef, weights: dict, images, *, image_size: int,
                   tta: str = "none") -> tuple[jax.Array, jax.Array]:
  """(logits float32 (B, C), va float32 (B, 2)) of uint8 images (B, S, S, 3).

  Pure and jit-able: the one forward pass used by evaluation, prediction and
  export. ``tta="flip"`` averages the image and its horizontal mirror.
  """
  if tta not in TTA_MODES:
    raise ValueError(f"--tta={tta!r}: use one of {TTA_MODES}.")
  model = nnx.merge(graphdef, weights["params"], weights["rest"])
  x = augment.resize_images(images, image_size)

  def forward(x):
    logits, va = model(model.preprocess(x), train=False)
    return logits.astype(jnp.float32), va.astype(jnp.float32)

  logits, va = forward(x)
  if tta == "flip":
    logits_m, va_m = forward(x[:, :, ::-1, :])
    logits, va = (logits + logits_m) / 2, (va + va_m) / 2
  return logits, va


def eval_step(state: dict, batch: dict, *, graphdef, config, class_weights,
              tta: str = "none", use_ema: bool = True):
  """Predictions and loss sums for a padded eval batch (``mask`` marks rows)."""
  logits, va = predict_images(graphdef, eval_weights(state, use_ema),
                              batch["image"], image_size=config.image_size,
                              tta=tta)
  _, stats = losses.multitask_loss(
      logits, va, example_mask=batch["mask"],
      **losses.config_loss_kwargs(config, batch, class_weights))
  out = {"logits": logits, "va": va}
  out.update({k: batch[k] for k in ("expression", "valence", "arousal", "mask",
                                    "index") if k in batch})
  return out, stats


def make_eval_step(graphdef, config, mesh, class_weights=None, *,
                   tta: str = "none", use_ema: bool = True):
  """The jitted eval step; outputs replicated so every host computes metrics."""
  if tta not in TTA_MODES:
    raise ValueError(f"--tta={tta!r}: use one of {TTA_MODES}.")
  repl = sharding.replicated(mesh)
  return jax.jit(
      functools.partial(eval_step, graphdef=graphdef, config=config,
                        class_weights=class_weights, tta=tta, use_ema=use_ema),
      out_shardings=(repl, repl))


def evaluate(state: dict, eval_fn, config, mesh, *, split: str = "val",
             collect: bool = False, classes: int | None = None,
             progress: bool | None = False) -> dict:
  """Metrics over every example of ``split`` exactly once.

  Args:
    state: the train state (or any dict with ``params``/``rest``[/``ema``]).
    eval_fn: from ``make_eval_step``.
    config: the run's config (data dir, batch size, image size, loss weights).
    mesh: the device mesh.
    split: a split of the prepared data (``val``, ``holdout``, ``train``).
    collect: also return ``"examples"``: per-example numpy arrays in source
      order (``index``, ``logits``, ``probs``, ``va``, ``expression``,
      ``valence``, ``arousal``), padding removed; under ``classes=7`` the
      Contempt rows are left out and ``logits``/``probs`` have 7 columns.
    classes: ``None`` or ``config.num_classes`` for the model's own protocol;
      ``7`` scores an 8-class model on the 7-class protocol (no ``loss``
      then: the model's loss is an 8-class quantity).
    progress: a batch bar (``progress.eval_bar``); None = on for a terminal
      on process 0; False (default, the trainer's periodic evals) = off.

  Returns:
    ``metrics.evaluate``'s dict (accuracy, macro-F1, confusion matrix,
    per-class F1/precision/recall, valence/arousal RMSE/PCC/CCC/SAGR) plus
    ``loss``, ``per_class_support`` and ``num_classes``.
  """
  num_classes = int(config.num_classes)
  classes = num_classes if classes is None else int(classes)
  if classes not in (num_classes, 7) or (classes == 7 and num_classes != 8):
    raise ValueError(
        f"--classes={classes}: a {num_classes}-class model can be scored with "
        f"--classes={num_classes}" + (" or --classes=7" if num_classes == 8
                                      else "") + ".")
  local_bs = sharding.local_batch_size(config.eval_batch_size, mesh,
                                       flag="config.eval_batch_size")
  ds, n = input_pipeline.eval_dataset(
      config, split=split, local_batch_size=local_bs,
      process_index=jax.process_index(), process_count=jax.process_count())
  outs, stats = [], []
  batches = input_pipeline.iterate(ds)
  if progress is not False:
    from affectjax import progress as progress_lib  # pylint: disable=g-import-not-at-top
    batches = progress_lib.eval_bar(
        batches, input_pipeline.eval_num_batches(
            n, local_bs * jax.process_count()), desc=f"eval {split}",
        enabled=progress)
  for batch in batches:
    out, batch_stats = eval_fn(state, sharding.shard_batch(batch, mesh))
    outs.append(out)
    stats.append(batch_stats)
  outs, stats = jax.device_get((outs, stats))
  full = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  keep = full["mask"].astype(bool)  # Padding rows (mask == 0) are dropped.
  if keep.sum() != n:  # The padding/masking invariant.
    raise RuntimeError(f"Evaluated {int(keep.sum())} of the {n} examples of "
                       f"{config.data.dir} split {split!r}; this is a bug in "
                       "affectjax.input_pipeline.eval_dataset.")
  logits = full["logits"]
  if classes == 7:
    keep &= full["expression"] != CONTEMPT
    logits = logits[:, :CONTEMPT]
  acc = metrics_lib.EvalAccumulator(classes)
  acc.update(expression=full["expression"], logits_or_pred=logits,
             valence=full["valence"], arousal=full["arousal"],
             va_pred=full["va"], example_mask=keep)
  result = {}
  if classes == num_classes:
    result["loss"] = float(losses.loss_from_stats(
        losses.sum_stats(stats), **losses.term_weights(config)))
  result.update(acc.result())
  result["num_classes"] = classes
  result["per_class_support"] = np.asarray(
      result["confusion_matrix"]).sum(axis=1).tolist()
  if collect:
    result["examples"] = _collect(full, keep, logits)
  return result


def _collect(full: dict, keep: np.ndarray, logits: np.ndarray) -> dict:
  """Per-example arrays of the real rows, sorted by source index."""
  index = full.get("index")
  if index is None:
    raise ValueError("evaluate(collect=True) needs batches with an 'index' "
                     "field (input_pipeline.eval_dataset provides it).")
  order = np.argsort(index[keep], kind="stable")
  pick = lambda a: a[keep][order]  # noqa: E731
  logits = pick(logits).astype(np.float32)
  return {"index": pick(index).astype(np.int64), "logits": logits,
          "probs": softmax(logits),
          "va": pick(full["va"]).astype(np.float32),
          "expression": pick(full["expression"]).astype(np.int64),
          "valence": pick(full["valence"]).astype(np.float32),
          "arousal": pick(full["arousal"]).astype(np.float32)}


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64, returned as float32."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def metrics_subset(result: dict[str, Any]) -> dict[str, Any]:
  """``result`` without the per-example arrays (what goes to metrics.jsonl)."""
  return {k: v for k, v in result.items() if k != "examples"}
