"""The evaluation step and the evaluation pass, shared by every consumer.

The trainer calls ``evaluate`` at each evaluation; ``affectjax.evaluate``
(metrics files and plots of a checkpoint), ``affectjax.report`` and the tests
reuse it, so "the trainer's number" and "the evaluation tool's number" are
the same computation.

  make_eval_step(graphdef, config, mesh, class_weights=None, *, tta="none")
      -> jitted (state, batch) -> (out, stats), outputs replicated.
  evaluate(state, eval_fn, config, mesh, *, split="val", collect=False,
           classes=None, model_classes=None) -> dict
  match_classes(model_classes, data_names, *, classes=None) -> ClassMatch

Batches are uint8 (B, S, S, 3) at the host size S (what the input path decodes
to: the prepared size, or a DCT-scaled fraction of it); the step resizes to
``config.image_size`` on the device (``augment.resize_images``), then applies
the model's own preprocessing. With ``tta="flip"`` the step also runs the
mirrored batch and averages logits and valence/arousal of the two passes;
``tta="crops"`` averages ten views (``tta_views``): the image, its four
corner crops of ``TTA_CROP_SIDE`` of the side resized back, and the mirror of
each, the multi-crop testing of FER papers.

Classes are matched by name (``ClassMatch``): the model's class names (the
run's) against the data's (its manifest's ``label_names``). Only the classes
both have are compared. A class the data lacks loses its logit column before
the argmax; rows of a class the model lacks are left out and counted. The
same mechanism serves cross-dataset evaluation (an 8-class AffectNet model on
7-class RAF-DB or FER2013, a 7-class model on FERPlus's 8 classes) and the
7-class protocol of published AffectNet numbers (``classes=7``: the data's
classes restricted to the 7 without Contempt, so the Contempt logit and every
Contempt row are dropped).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affectjax import augment
from affectjax import data
from affectjax import input_pipeline
from affectjax import losses
from affectjax import metrics as metrics_lib
from affectjax import sharding

TTA_MODES = ("none", "flip", "crops")
# tta="crops": the corner crops' side, as a fraction of the image's. Their
# area (0.81) is inside the random crops training draws (the recipes'
# `augment.crop_scale` reaches 0.7-0.8), so the views look like training's.
TTA_CROP_SIDE = 0.9


def eval_weights(state: dict, use_ema: bool = True) -> dict:
  """``{"params", "rest"}`` to evaluate: the EMA weights when the state has them."""
  if use_ema and "ema" in state:
    return state["ema"]
  return {"params": state["params"], "rest": state["rest"]}


def predict_images(graphdef, weights: dict, images, *, image_size: int,
                   tta: str = "none") -> tuple[jax.Array, jax.Array]:
  """(logits float32 (B, C), va float32 (B, 2)) of uint8 images (B, S, S, 3).

  Pure and jit-able: the one forward pass used by evaluation, prediction and
  export. ``tta`` averages the logits and valence/arousal of the views
  ``tta_views`` makes (one pass each).
  """
  model = nnx.merge(graphdef, weights["params"], weights["rest"])

  def forward(x):
    logits, va = model(model.preprocess(x), train=False)
    return logits.astype(jnp.float32), va.astype(jnp.float32)

  views = tta_views(augment.resize_images(images, image_size), tta)
  outs = [forward(x) for x in views]
  return (sum(o[0] for o in outs) / len(outs),
          sum(o[1] for o in outs) / len(outs))


def tta_views(x: jax.Array, tta: str) -> list[jax.Array]:
  """The views of a float32 batch (B, S, S, C) that ``tta`` averages.

  "none": the batch; "flip": it and its mirror; "crops": the batch and its
  four corner crops of TTA_CROP_SIDE of the side, each resampled to S x S
  (bilinear, `augment.crop_batch`), and the mirror of each (10 views).
  """
  if tta not in TTA_MODES:
    raise ValueError(f"--tta={tta!r}: use one of {TTA_MODES}.")
  if tta == "none":
    return [x]
  views = [x]
  if tta == "crops":
    side = TTA_CROP_SIDE * x.shape[1], TTA_CROP_SIDE * x.shape[2]
    far = x.shape[1] - side[0], x.shape[2] - side[1]
    views += [augment.crop_batch(x, (top, left, *side))
              for top in (0.0, far[0]) for left in (0.0, far[1])]
  return views + [v[:, :, ::-1, :] for v in views]


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


@dataclasses.dataclass(frozen=True)
class ClassMatch:
  """How a model's classes meet a data set's classes, by name.

  ``model`` and ``data`` are the class names in id order (index = class id)
  on each side; ``allowed``, when set, restricts the comparison further (the
  ``classes=7`` protocol). ``compared`` keeps the model's order, so its
  columns are a selection of the model's logits.
  """
  model: tuple[str, ...]
  data: tuple[str, ...]
  allowed: tuple[str, ...] | None = None

  @property
  def compared(self) -> tuple[str, ...]:
    """The classes scored: in both, and allowed; in the model's order."""
    return tuple(n for n in self.model if n in self.data and (
        self.allowed is None or n in self.allowed))

  @property
  def left_out(self) -> dict[str, str]:
    """Each class of either side that is not compared, with the reason."""
    out = {}
    for n in dict.fromkeys(self.model + self.data):
      if n not in self.data:
        out[n] = "not in the data"
      elif n not in self.model:
        out[n] = "not in the model"
      elif self.allowed is not None and n not in self.allowed:
        out[n] = f"left out by --classes={len(self.allowed)}"
    return out

  @property
  def identical(self) -> bool:
    """Both sides have exactly the compared classes (the loss is then the
    model's own; any other match scores a subset of its classes)."""
    return set(self.model) == set(self.data) == set(self.compared)

  def step_ids(self) -> np.ndarray:
    """int32 [len(data)]: the label each data class id is fed to the eval
    step as: its model class id, or ``len(model) + data id`` for a class the
    model lacks (outside the model's range, so the loss masks it, and still
    decodable after the gather by ``row_names``)."""
    c = len(self.model)
    return np.asarray([self.model.index(n) if n in self.model else c + d
                       for d, n in enumerate(self.data)], np.int32)

  def row_names(self) -> tuple[str, ...]:
    """The class name of each step label id (see ``step_ids``)."""
    return self.model + self.data

  def compared_ids(self) -> np.ndarray:
    """int32 [len(model) + len(data)]: each step label id's compared id, -1
    for a class that is not compared (its rows are left out)."""
    compared = self.compared
    return np.asarray([compared.index(n) if n in compared else -1
                       for n in self.model] + [-1] * len(self.data), np.int32)

  def model_columns(self) -> np.ndarray:
    """The model's logit columns of the compared classes, in compared order."""
    return np.asarray([self.model.index(n) for n in self.compared], np.int64)


def data_classes(manifest: dict) -> tuple[str, ...]:
  """A prepared dir's class names in id order: the manifest's ``label_names``
  (data_prep records them in affectjax's naming), else AffectNet's names for
  its ``num_classes`` (manifests written before names were recorded)."""
  names = manifest.get("label_names")
  if names is None:
    return data.label_names(int(manifest.get("num_classes", 8)))
  return tuple(str(n) for n in names)


def match_classes(model_classes: Sequence[str], data_names: Sequence[str],
                  *, classes: int | None = None,
                  data_dir: str = "the data") -> ClassMatch:
  """Matches classes by name; ``classes=7``/``8`` restricts the comparison
  to AffectNet's 7 (no Contempt) or 8 classes and requires all of them.

  Raises ValueError when fewer than 2 classes are shared (no classification
  to score), when either side names a class twice, or when ``classes`` asks
  for classes the two sides do not share.
  """
  model, data_ = tuple(model_classes), tuple(data_names)
  for side, names in (("the model", model), (data_dir, data_)):
    if len(set(names)) != len(names):
      raise ValueError(f"{side} names a class twice: {list(names)}.")
  allowed = None
  if classes is not None:
    if int(classes) not in (7, 8):
      raise ValueError(f"--classes={classes}: use 7 (AffectNet's classes "
                       "without Contempt) or 8, or leave it out to compare "
                       "every class the model and the data share.")
    allowed = data.label_names(int(classes))
  match = ClassMatch(model, data_, allowed)
  if len(match.compared) < 2:
    raise ValueError(
        f"{data_dir} shares {len(match.compared)} class(es) with the model "
        f"({', '.join(match.compared) or 'none'}); at least 2 are needed to "
        f"score it. The model's classes: {', '.join(model)}; the data's: "
        f"{', '.join(data_)} (manifest.json's label_names, which data_prep "
        "writes in affectjax's class names).")
  if allowed is not None and set(match.compared) != set(allowed):
    raise ValueError(
        f"--classes={classes}: the model ({len(model)} classes) and "
        f"{data_dir} ({len(data_)} classes) share only "
        f"{', '.join(match.compared)}; leave --classes out to score those.")
  return match


def evaluate(state: dict, eval_fn, config, mesh, *, split: str = "val",
             collect: bool = False, classes: int | None = None,
             model_classes: Sequence[str] | None = None,
             progress: bool | None = False,
             manifest: dict | None = None) -> dict:
  """Metrics over every example of ``split`` exactly once.

  Args:
    state: the train state (or any dict with ``params``/``rest``[/``ema``]).
    eval_fn: from ``make_eval_step``; its class weights must be the model's
      (the run's), never recomputed from another data dir.
    config: the run's config (data dir, batch size, image size, loss weights).
    mesh: the device mesh.
    split: a split of the prepared data (``val``, ``holdout``, ``train``).
    collect: also return ``"examples"``: per-example numpy arrays in source
      order (``index``, ``logits``, ``probs``, ``va``, ``expression``,
      ``valence``, ``arousal``), padding removed; the rows and logit columns
      are those of the compared classes, ``expression`` in their ids.
    classes: None compares every class the model and the data share; ``7``
      restricts the comparison to AffectNet's 7 classes without Contempt (an
      8-class model on the 7-class protocol), ``8`` requires all 8.
    model_classes: the model's class names in logit order (default
      ``data.label_names(config.num_classes)``).
    progress: a batch bar (``progress.eval_bar``); None = on for a terminal
      on process 0; False (default, the trainer's periodic evals) = off.
    manifest: ``config.data.dir``'s manifest when the caller has read it
      (the trainer reads it once per run); None reads it.

  Returns:
    ``metrics.evaluate``'s dict (accuracy, macro-F1, confusion matrix,
    per-class F1/precision/recall, valence/arousal RMSE/PCC/CCC/SAGR) over
    the compared rows, plus ``per_class_support``, ``num_classes`` and
    ``class_names`` (the compared classes), ``classes_left_out`` ({name:
    reason}), ``rows_left_out`` and ``rows_left_out_by_class``; and ``loss``
    only when the model and the data have the same classes (otherwise the
    model's loss is not defined on the data).
  """
  if model_classes is None:
    model_classes = data.label_names(int(config.num_classes))
  if len(model_classes) != int(config.num_classes):
    raise ValueError(f"{len(model_classes)} class names for a "
                     f"{config.num_classes}-class model: {list(model_classes)}.")
  if manifest is None:
    manifest = data.read_manifest(config.data.dir)
  data_names = data_classes(manifest)
  match = match_classes(model_classes, data_names, classes=classes,
                        data_dir=str(config.data.dir))
  step_ids = match.step_ids()
  relabel = not np.array_equal(step_ids, np.arange(len(data_names)))
  local_bs = sharding.local_batch_size(config.eval_batch_size, mesh,
                                       flag="config.eval_batch_size")
  ds, n = input_pipeline.eval_dataset(
      config, split=split, local_batch_size=local_bs,
      process_index=jax.process_index(), process_count=jax.process_count(),
      manifest=manifest)
  outs, stats = [], []
  batches = input_pipeline.iterate(ds)
  if progress is not False:
    from affectjax import progress as progress_lib  # pylint: disable=g-import-not-at-top
    batches = progress_lib.eval_bar(
        batches, input_pipeline.eval_num_batches(
            n, local_bs * jax.process_count()), desc=f"eval {split}",
        enabled=progress)
  for batch in batches:
    data_ids = np.asarray(batch["expression"])
    real = np.asarray(batch["mask"]).astype(bool)
    bad = real & ((data_ids < 0) | (data_ids >= len(data_names)))
    if bad.any():
      raise ValueError(
          f"{config.data.dir} split {split!r} holds expression "
          f"{int(data_ids[bad][0])}, outside its manifest's "
          f"{len(data_names)} classes; prepare it again with data_prep.")
    if relabel:  # Data ids -> the labels the model's loss understands.
      batch = {**batch, "expression": np.where(
          real, step_ids[np.clip(data_ids, 0, len(data_names) - 1)], 0
      ).astype(data_ids.dtype)}
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
  # Step labels -> compared ids; rows of classes not compared are left out.
  step_labels = np.where(keep, full["expression"], 0)
  compared_ids = match.compared_ids()[step_labels]
  left = keep & (compared_ids < 0)
  keep &= compared_ids >= 0
  full["expression"] = np.maximum(compared_ids, 0)
  logits = full["logits"][:, match.model_columns()]
  acc = metrics_lib.EvalAccumulator(len(match.compared))
  acc.update(expression=full["expression"], logits_or_pred=logits,
             valence=full["valence"], arousal=full["arousal"],
             va_pred=full["va"], example_mask=keep)
  result = {}
  if match.identical:
    result["loss"] = float(losses.loss_from_stats(
        losses.sum_stats(stats), **losses.term_weights(config)))
  result.update(acc.result())
  result["num_classes"] = len(match.compared)
  result["class_names"] = list(match.compared)
  result["per_class_support"] = np.asarray(
      result["confusion_matrix"]).sum(axis=1).tolist()
  result["classes_left_out"] = match.left_out
  result["rows_left_out"] = int(left.sum())
  names = match.row_names()
  result["rows_left_out_by_class"] = {
      names[i]: int(c) for i, c in enumerate(np.bincount(
          step_labels[left], minlength=len(names))) if c}
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
