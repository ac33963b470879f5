"""Training and evaluation loop: ``train_and_evaluate(config, workdir)``.

The run, in order (the sections below follow it):
  1. mesh over all devices; per-process batch sizes;
  2. model built by name, optionally ImageNet-initialized, split into
     (graphdef, params, rest) and placed replicated on the mesh;
  3. optimizer from the config; train state = params + rest + opt_state + step;
  4. resume from the latest checkpoint in ``workdir`` (state and data order);
  5. loop: a jitted, donated, pure train step; metrics stay on the device
     until a log step, where the host checks them for NaN;
  6. periodic and final evaluation over every validation example once;
  7. checkpoints every ``checkpoint_every_steps`` and at the end.

The hot step is a pure function of the ``nnx.split`` state (plain ``jax.jit``,
not ``nnx.jit``), which keeps per-step host work to a dispatch.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from affectjax import checkpoint as ckpt_lib
from affectjax import input_pipeline
from affectjax import losses
from affectjax import metric_log
from affectjax import metrics as metrics_lib
from affectjax import models
from affectjax import optim
from affectjax import sharding

State = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------
# Model and state.
# --------------------------------------------------------------------------
def create_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """Builds ``config.model.name`` and applies ``config.model.init``."""
  if config.model.dtype not in _DTYPES:
    raise ValueError(f"--config.model.dtype={config.model.dtype!r}: use one of "
                     f"{sorted(_DTYPES)}.")
  model = models.create(
      config.model.name, rngs=nnx.Rngs(config.seed),
      num_classes=config.num_classes, dtype=_DTYPES[config.model.dtype],
      **dict(config.model.kwargs))
  if config.model.init == "imagenet":
    path = models.imagenet_weights_path(config.model.name,
                                        config.model.weights_dir)
    models.load_imagenet_weights(model, path)
    logging.info("Loaded ImageNet weights from %s", path)
  elif config.model.init != "scratch":
    raise ValueError(f"--config.model.init={config.model.init!r}: use "
                     "'scratch' or 'imagenet'.")
  return model


def init_state(config, mesh) -> tuple[nnx.GraphDef, State, optax.GradientTransformation]:
  """Creates the replicated train state on ``mesh``."""
  model = create_model(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.create(config, params)
  repl = sharding.replicated(mesh)
  params, rest = jax.device_put((params, rest), repl)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), repl),
           "params": params, "rest": rest, "opt_state": opt_state}
  return graphdef, state, tx


def _class_weights(config) -> np.ndarray | None:
  if config.loss.class_weighting == "none":
    return None
  path = os.path.join(config.data.dir, "manifest.json")
  with open(path) as f:
    counts = json.load(f)["splits"]["train"]["class_counts"]
  return np.asarray(losses.class_weights_from_counts(
      counts, mode=config.loss.class_weighting), np.float32)


def _loss_kwargs(config, batch, class_weights):
  return dict(expression=batch["expression"], valence=batch["valence"],
              arousal=batch["arousal"],
              valence_weight=config.loss.valence_weight,
              arousal_weight=config.loss.arousal_weight,
              label_smoothing=config.loss.label_smoothing,
              class_weights=class_weights)


# --------------------------------------------------------------------------
# Steps. Pure functions of the state; jitted in `make_steps`.
# --------------------------------------------------------------------------
def train_step(state: State, batch: dict, *, graphdef, tx, config,
               class_weights, train_backbone: bool) -> tuple[State, dict]:
  """One optimizer step on a global batch of uint8 images."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state["rest"], copy=True)
    x = model.preprocess(batch["image"])
    logits, va = model(x, train=True, train_backbone=train_backbone,
                       rngs=nnx.Rngs(dropout=rng))
    loss, stats = losses.multitask_loss(
        logits, va, **_loss_kwargs(config, batch, class_weights))
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, (stats, new_rest)

  (loss, (stats, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"step": state["step"] + 1, "params": params, "rest": rest,
               "opt_state": opt_state}
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                     **stats}


def eval_step(state: State, batch: dict, *, graphdef, config, class_weights):
  """Predictions and loss sums for a padded eval batch (``mask`` marks rows)."""
  model = nnx.merge(graphdef, state["params"], state["rest"])
  x = model.preprocess(batch["image"])
  logits, va = model(x, train=False)
  _, stats = losses.multitask_loss(
      logits, va, example_mask=batch["mask"],
      **_loss_kwargs(config, batch, class_weights))
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = {"pred": pred, "va": va.astype(jnp.float32)}
  out.update({k: batch[k] for k in ("expression", "valence", "arousal", "mask")})
  return out, stats


def make_steps(graphdef, tx, config, mesh, class_weights=None):
  """Jitted train/eval steps: state replicated and donated, batch sharded."""
  repl = sharding.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, config=config,
                        class_weights=class_weights),
      static_argnames=("train_backbone",), donate_argnums=0,
      out_shardings=(repl, repl))
  # Predictions come back replicated so every host can compute metrics.
  evaluate = jax.jit(
      functools.partial(eval_step, graphdef=graphdef, config=config,
                        class_weights=class_weights),
      out_shardings=(repl, repl))
  return train, evaluate


# --------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------
def evaluate(state: State, eval_fn, config, mesh) -> dict:
  """Metrics over every example of the validation split exactly once."""
  local_bs = sharding.local_batch_size(config.eval_batch_size, mesh,
                                       flag="config.eval_batch_size")
  ds, n = input_pipeline.eval_dataset(
      config, local_batch_size=local_bs, process_index=jax.process_index(),
      process_count=jax.process_count())
  outs, stats = [], []
  for batch in input_pipeline.iterate(ds):
    out, batch_stats = eval_fn(state, sharding.shard_batch(batch, mesh))
    outs.append(out)
    stats.append(batch_stats)
  outs, stats = jax.device_get((outs, stats))
  acc = metrics_lib.EvalAccumulator(config.num_classes)
  for o in outs:  # Padding rows (mask == 0) are dropped here.
    acc.update(expression=o["expression"], logits_or_pred=o["pred"],
               valence=o["valence"], arousal=o["arousal"], va_pred=o["va"],
               example_mask=o["mask"])
  result = {"loss": float(losses.loss_from_stats(
      losses.sum_stats(stats), valence_weight=config.loss.valence_weight,
      arousal_weight=config.loss.arousal_weight))}
  result.update(acc.result())
  if result["num_examples"] != n:  # The padding/masking invariant.
    raise RuntimeError(f"Evaluated {result['num_examples']} of the {n} "
                       f"examples in {config.data.dir}; this is a bug in "
                       "affectjax.input_pipeline.eval_dataset.")
  return result


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------
def _summarize_train(history: list[dict], step: int, seconds: float,
                     examples: int) -> dict:
  host = jax.device_get(history)
  loss = float(np.mean([h["loss"] for h in host]))
  if not np.isfinite(loss):
    raise FloatingPointError(
        f"Training loss became {loss} at or before step {step}. Lower "
        "--config.optimizer.learning_rate or enable "
        "--config.optimizer.grad_clip_norm; the last good checkpoint is in "
        "the workdir.")
  return {"loss": loss,
          "grad_norm": float(np.mean([h["grad_norm"] for h in host])),
          "steps_per_sec": len(history) / max(seconds, 1e-9),
          "examples_per_sec": examples / max(seconds, 1e-9)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to ``config.total_steps`` (resuming if possible); returns final eval."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  manifest = os.path.join(config.data.dir, "manifest.json")
  if not os.path.exists(manifest):
    raise FileNotFoundError(
        f"--config.data.dir={config.data.dir!r} holds no manifest.json. Point "
        "it at the --output_dir of `python -m data_prep.affectnet` (or "
        "`./launch.sh prep`); `./launch.sh demo` prepares a synthetic one in "
        "runs/demo/data/arrayrecord.")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # Mesh and batch sizes.
  mesh = sharding.make_mesh()
  local_bs = sharding.local_batch_size(config.batch_size, mesh,
                                       flag="config.batch_size")

  # Model, optimizer, steps.
  graphdef, state, tx = init_state(config, mesh)
  class_weights = _class_weights(config)
  train_fn, eval_fn = make_steps(graphdef, tx, config, mesh, class_weights)

  # Input.
  train_ds = input_pipeline.train_dataset(
      config, local_batch_size=local_bs, process_index=jax.process_index(),
      process_count=jax.process_count())
  train_iter = iter(train_ds)

  # Resume.
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               every_steps=config.checkpoint_every_steps,
                               keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, ckpt_lib.abstract_like(state), train_iter)
    logging.info("Resumed from %s at step %d", ckpt.directory, latest)
  step = int(jax.device_get(state["step"]))

  log = metric_log.MetricLog(workdir)
  history, last_eval = [], None
  t0 = time.perf_counter()
  while step < config.total_steps:
    batch = sharding.shard_batch(next(train_iter), mesh)
    state, m = train_fn(state, batch,
                        train_backbone=optim.backbone_trainable(config, step))
    step += 1
    history.append(m)
    if step % config.log_every_steps == 0 or step == config.total_steps:
      dt = time.perf_counter() - t0
      summary = _summarize_train(history, step, dt,
                                 len(history) * config.batch_size)
      log.write("train", step, **summary)
      logging.info("step %d: loss %.4f, %.1f examples/s", step,
                   summary["loss"], summary["examples_per_sec"])
      history, t0 = [], time.perf_counter()
    if ckpt.should_save(step, config.total_steps):
      ckpt.save(step, state, train_iter)
    if step % config.eval_every_steps == 0 or step == config.total_steps:
      last_eval = log.write("val", step, **evaluate(state, eval_fn, config, mesh))
      logging.info("eval at step %d: %s", step, _short(last_eval))

  if last_eval is None:  # Already finished before this run: evaluate only.
    last_eval = evaluate(state, eval_fn, config, mesh)
    last_eval = {"split": "val", "step": step, **last_eval}
    if not log.has("val", step):
      log.write("val", step, **{k: v for k, v in last_eval.items()
                                if k not in ("split", "step")})
  ckpt.close()
  log.close()
  close = getattr(train_iter, "close", None)
  if close is not None:
    close()
  # jax on CPU may alias the last batch's host buffers, which Grain keeps in
  # shared memory; drop them now, while Grain's deleter still runs.
  batch = None
  gc.collect()
  return last_eval


def _short(record: dict) -> str:
  keys = ("loss", "accuracy", "macro_f1", "valence_ccc", "arousal_ccc")
  return ", ".join(f"{k}={record[k]:.4f}" for k in keys
                   if isinstance(record.get(k), float))
