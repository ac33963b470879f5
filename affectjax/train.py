"""Training loop: ``train_and_evaluate(config, workdir)``.

The run, in order (the sections below follow it):
  1. the prepared data is checked against the config (classes, image size);
  2. mesh over all devices; per-process batch sizes;
  3. model built abstractly (``nnx.eval_shape``), then materialized replicated
     on the mesh by one jitted init; ImageNet arrays, if any, placed once;
  4. optimizer from the config; train state = params + rest + opt_state + step
     (+ an EMA of the weights when ``config.ema_decay > 0``);
  5. resume from the latest checkpoint in ``workdir`` (state and data order);
     every process restores the same step;
  6. loop: a jitted, donated, pure train step (augmentation runs inside it, on
     the device); metrics stay on the device until a log step, where the host
     checks them for NaN and logs the input-wait share;
  7. periodic and final evaluation over every example of the selection split
     (``holdout`` when it exists) and of ``val`` (unless
     ``config.eval_val_during_training`` is off: then val is read only by
     ``evaluate --split=val``, after); the best checkpoint by
     ``config.checkpoint.best_metric`` is kept besides the latest N;
  8. SIGTERM/SIGINT (preemption) finishes the step, saves synchronously and
     returns; an exception never leaves an async save or workers behind;
  9. under ``config.time_budget`` (``affectjax.time_budget``) the first
     steps are a measurement window, then a plan sets the step count and
     cadences (the schedule's length is an argument of the compiled step),
     and a deadline may end the run early with a final evaluation and save.

The hot step is a pure function of the ``nnx.split`` state (plain ``jax.jit``,
not ``nnx.jit``), which keeps per-step host work to a dispatch.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from affectjax import augment
from affectjax import checkpoint as ckpt_lib
from affectjax import data
from affectjax import device_prefetch
from affectjax import fileio
from affectjax import input_pipeline
from affectjax import losses
from affectjax import metric_log
from affectjax import metrics as metrics_lib
from affectjax import optim
from affectjax import preemption
from affectjax import progress
from affectjax import report
from affectjax import run_contract
from affectjax import scoring
from affectjax import sharding
from affectjax import time_budget
from affectjax import train_state
from affectjax import workdir as workdir_lib

State = train_state.State


# --------------------------------------------------------------------------
# Checks at start: a config that cannot work fails before any training.
# --------------------------------------------------------------------------
class ConfigError(ValueError):
  """A config (or prepared data) that cannot work, found before training.

  ``main`` prints it as one line, without a traceback (a user's mistake).
  """


def selection_metrics() -> tuple[str, ...]:
  """The evaluation metrics a checkpoint can be ranked (and stopped) by."""
  return ("loss", "accuracy", "macro_f1") + tuple(
      f"{t}_{m}" for t in metrics_lib.TARGETS
      for m in metrics_lib.REGRESSION_METRICS)


def check_selection(config: ml_collections.ConfigDict) -> None:
  """Refuses a ``best_metric`` no evaluation produces, before any training.

  Otherwise the typo would surface at the first evaluation, possibly hours in.
  An empty name keeps only the latest checkpoints, which early stopping
  cannot work with.
  """
  name = config.checkpoint.best_metric
  if not name:
    if config.early_stopping_patience > 0:
      raise ConfigError(
          "--config.early_stopping_patience="
          f"{config.early_stopping_patience} needs a metric to watch, but "
          "--config.checkpoint.best_metric is empty; choose one of "
          f"{', '.join(selection_metrics())}.")
    return
  if name not in selection_metrics():
    close = difflib.get_close_matches(name, selection_metrics(), n=1)
    raise ConfigError(
        f"--config.checkpoint.best_metric={name!r} is not an evaluation "
        + (f"metric (did you mean {close[0]!r}?); " if close else "metric; ")
        + f"choose one of {', '.join(selection_metrics())}.")


def check_prepared_data(config: ml_collections.ConfigDict,
                        manifest: dict) -> None:
  """Refuses a prepared dir that does not fit the config, instead of coping silently.

  A different class count would mislabel every example; a prepared image
  smaller than ``config.image_size`` would be silently upsampled.
  """
  data_dir = config.data.dir
  prepared_classes = int(manifest.get("num_classes", config.num_classes))
  if prepared_classes != config.num_classes:
    raise ConfigError(
        f"{data_dir} was prepared with {prepared_classes} classes but "
        f"--config.num_classes={config.num_classes}. Set "
        f"--config.num_classes={prepared_classes}, or prepare the data again "
        f"with `./launch.sh prep ... --classes={config.num_classes}`.")
  prepared_size = int(manifest["image_size"])
  if prepared_size < config.image_size:
    raise ConfigError(
        f"{data_dir} holds {prepared_size} px images but "
        f"--config.image_size={config.image_size}: training would upsample "
        f"every face. Prepare the data again with `./launch.sh prep ... "
        f"--image_size={config.image_size}` (or larger; the default 320 fits "
        f"every shipped config), or lower --config.image_size to "
        f"{prepared_size}.")


def training_splits(config: ml_collections.ConfigDict,
                    select_split: str) -> tuple[str, ...]:
  """The splits evaluated while training: the selection split, then ``val``
  unless ``config.eval_val_during_training`` is off (a protocol that reads its
  test split once, after training: FER2013's PrivateTest). ``val`` is still
  evaluated when it is the selection split itself (no holdout)."""
  if config.get("eval_val_during_training", True):
    return tuple(dict.fromkeys((select_split, "val")))
  return (select_split,)


def selection_split(config: ml_collections.ConfigDict, manifest: dict) -> str:
  """The split that picks the best checkpoint and drives early stopping."""
  choice = config.data.selection_split
  if choice == "auto":
    return "holdout" if "holdout" in manifest["splits"] else "val"
  if choice not in manifest["splits"]:
    raise ConfigError(
        f"--config.data.selection_split={choice!r}, but {config.data.dir} has "
        f"the splits {sorted(manifest['splits'])}; prepare a holdout split "
        "with `./launch.sh prep ... --holdout_fraction=0.05` or use 'auto'.")
  return choice


# --------------------------------------------------------------------------
# Steps. Pure functions of the state; jitted in `make_steps`.
# --------------------------------------------------------------------------
def stream_keys(seed: int) -> dict[str, jax.Array]:
  """The root keys of the training's random streams: ``dropout``, ``augment``.

  One ``jax.random.split`` of ``key(seed)``, a branch each; the step (and, for
  augmentation, the global row) is folded into its own branch only. Folding
  both into the same root (dropout ``fold_in(key, step)``, augmentation
  ``fold_in(key, constant)``) made the augmentation key equal dropout's at the
  step that equals the constant.
  """
  dropout, augment_root = jax.random.split(jax.random.key(seed))
  return {"dropout": dropout, "augment": augment_root}


def train_step(state: State, batch: dict, schedule: dict | None = None, *,
               graphdef, tx, config, class_weights,
               train_backbone: bool) -> tuple[State, dict]:
  """One optimizer step on a global batch of uint8 images (any stored size).

  ``schedule``: None (the config's lengths, fixed in the compiled step) or
  ``{"total_steps", "unfreeze_step"}`` as int32 arrays, a time budget's plan
  (see ``affectjax.time_budget``): the optimizer is then built on them here,
  so a new plan needs no new compile. The step returns the learning rate it
  applied (the head's).
  """
  total = config.total_steps
  if schedule is not None:
    total = schedule["total_steps"]
    tx = optim.create(config, total_steps=total,
                      unfreeze_step=schedule["unfreeze_step"])
  keys = stream_keys(config.seed)
  rng = jax.random.fold_in(keys["dropout"], state["step"])
  images = augment.train_images(batch["image"], key=keys["augment"],
                                step=state["step"], augment=config.augment,
                                size=config.image_size)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state["rest"], copy=True)
    x = model.preprocess(images)
    logits, va = model(x, train=True, train_backbone=train_backbone,
                       rngs=nnx.Rngs(dropout=rng))
    loss, stats = losses.multitask_loss(
        logits, va, **losses.config_loss_kwargs(config, batch, class_weights))
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, (stats, new_rest)

  # Plain gradients, or SAM's two passes (loss, stats and BatchNorm
  # statistics from the first, at the real weights).
  grad_fn = optim.value_and_grad(loss_fn, config, train_backbone=train_backbone)
  (loss, (stats, rest)), grads = grad_fn(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"step": state["step"] + 1, "params": params, "rest": rest,
               "opt_state": opt_state}
  if "ema" in state:
    new_state["ema"] = optim.ema_update(
        state["ema"], {"params": params, "rest": rest}, config.ema_decay,
        state["step"])
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                     "correct": stats["correct_sum"],
                     "labelled": stats["expression_count"],
                     "learning_rate": optim.schedule(config, total)(
                         state["step"])}


def make_steps(graphdef, tx, config, mesh, class_weights=None):
  """Jitted train/eval steps: state replicated and donated, batch sharded."""
  repl = sharding.replicated(mesh)
  train = jax.jit(
      sharding.traced_under(mesh, functools.partial(
          train_step, graphdef=graphdef, tx=tx, config=config,
          class_weights=class_weights)),
      static_argnames=("train_backbone",), donate_argnums=0,
      out_shardings=(repl, repl))
  return train, scoring.make_eval_step(graphdef, config, mesh, class_weights)


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------
def _summarize_train(history: list[dict], step: int, seconds: float,
                     examples: int, input_wait_share: float) -> dict:
  host = jax.device_get(history)
  loss = float(np.mean([h["loss"] for h in host]))
  if not np.isfinite(loss):
    raise FloatingPointError(
        f"Training loss became {loss} at or before step {step}. Lower "
        "--config.optimizer.learning_rate or enable "
        "--config.optimizer.grad_clip_norm; the last good checkpoint is in "
        "the workdir.")
  labelled = sum(float(h["labelled"]) for h in host)
  return {"loss": loss,
          "accuracy": sum(float(h["correct"]) for h in host) / max(labelled, 1),
          "grad_norm": float(np.mean([h["grad_norm"] for h in host])),
          # The rate the window's last step applied (from the step itself).
          "learning_rate": float(host[-1]["learning_rate"]),
          "steps_per_sec": len(history) / max(seconds, 1e-9),
          "examples_per_sec": examples / max(seconds, 1e-9),
          # Share of the wall time the loop spent waiting for input: near 0
          # when the device is the bottleneck, near 1 when the host is.
          "input_wait_share": input_wait_share}


def _agreed_step(step: int | None) -> int | None:
  """The step process 0 sees, on every process (restores must agree)."""
  if jax.process_count() == 1:
    return step
  mine = np.int64(-1 if step is None else step)
  agreed = int(multihost_utils.broadcast_one_to_all(mine))
  if agreed != int(mine):
    raise RuntimeError(
        f"Process {jax.process_index()} sees latest checkpoint step "
        f"{None if step is None else step} but process 0 sees "
        f"{None if agreed < 0 else agreed}: the workdir must be storage every "
        "host sees (a shared filesystem or gs://...), not a local disk.")
  return None if agreed < 0 else agreed


def _write_config(config, workdir: epath.Path) -> None:
  if jax.process_index() != 0:
    return
  fileio.write_text(workdir / workdir_lib.CONFIG_NAME,
                    config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       started_at: float | None = None) -> dict:
  """Trains to ``config.total_steps`` (resuming if possible); returns final eval.

  Under ``config.time_budget`` the step count is the plan's instead (see
  ``affectjax.time_budget``); the budget counts from ``started_at``
  (``time.time()`` seconds; default: this process's start).

  The final eval is the last step's ``val`` record (the selection split's
  when ``config.eval_val_during_training`` is off; its ``split`` says which);
  on process 0 it carries ``best`` (see ``_best_evaluation``) once a
  checkpoint has been ranked.
  ``workdir`` is any ``etils.epath`` path that every host sees (a local
  directory, a shared filesystem, ``gs://bucket/run``). A run stopped by
  SIGTERM/SIGINT returns ``{"preempted": True, "step", "signal"}`` after a
  synchronous checkpoint; rerunning the same call resumes it. A config that
  cannot work raises ``ConfigError`` before any training.
  """
  workdir = workdir_lib.path(workdir)
  if not config.data.dir:
    raise ConfigError("--config.data.dir is empty: point it at the --output_dir "
                     "of `./launch.sh prep` (`./launch.sh demo` prepares a "
                     "synthetic one in runs/demo/data/arrayrecord).")
  check_selection(config)
  try:
    budget_s = time_budget.parse(config.get("time_budget", ""))
  except time_budget.BudgetError as e:
    raise ConfigError(str(e)) from None
  if started_at is None:
    started_at = time_budget.process_start_time()
  manifest = data.read_manifest(config.data.dir)
  check_prepared_data(config, manifest)
  select_split = selection_split(config, manifest)
  workdir.mkdir(parents=True, exist_ok=True)
  _write_config(config, workdir)
  run_contract.write(workdir, config, manifest)

  # Mesh and batch sizes.
  mesh = sharding.make_mesh()
  local_bs = sharding.local_batch_size(config.batch_size, mesh,
                                       flag="config.batch_size")

  # Model, optimizer, steps.
  graphdef, state, tx = train_state.init_state(config, mesh)
  train_fn, eval_fn = make_steps(graphdef, tx, config, mesh,
                                  train_state.class_weights(config, manifest))

  with contextlib.ExitStack() as cleanup:
    # Closed in reverse order whatever happens (an exception, a signal): the
    # async save is committed and no input threads are left.
    stop = cleanup.enter_context(preemption.StopRequest())
    train_iter = device_prefetch.DevicePrefetch(iter(input_pipeline.train_dataset(
        config, local_batch_size=local_bs, process_index=jax.process_index(),
        process_count=jax.process_count(), manifest=manifest)), mesh)
    cleanup.callback(train_iter.close)
    ckpt = workdir_lib.checkpointer(workdir, config)
    cleanup.callback(ckpt.close)

    # Resume (every process restores the same step, on any topology; an
    # unreadable latest step falls back to the one before it).
    _agreed_step(ckpt.latest_step())
    try:
      restored, latest = ckpt.restore_latest(ckpt_lib.abstract_like(state),
                                             train_iter)
    except ckpt_lib.IncompatibleCheckpointError as e:
      raise ConfigError(str(e)) from None
    if latest is not None:
      state = restored
      logging.info("Resumed from %s at step %d", ckpt.directory, latest)
    elif config.init_from:  # A fine-tune's first start (never on a resume).
      from affectjax import init_from  # pylint: disable=g-import-not-at-top
      state = init_from.start(config, workdir, state, tx, mesh, manifest)
    step = int(jax.device_get(state["step"]))
    # Lines of steps after the restored one were written by a run that died
    # before its next checkpoint; they are replayed now, so they go.
    log = metric_log.MetricLog(workdir, resume_step=step)
    cleanup.callback(log.close)
    # The time budget (off: run_config is config, schedule None).
    try:
      budget = time_budget.Tracker(config, workdir, budget_s=budget_s,
                                   started_at=started_at, step=step, mesh=mesh)
    except time_budget.BudgetError as e:
      raise ConfigError(str(e)) from None
    run_config = budget.run_config
    bar = cleanup.enter_context(progress.TrainProgress(
        run_config.total_steps, step))

    def run_evals(step: int) -> tuple[dict, dict | None]:
      """Evaluates the selection split (and val, unless it is off).

      Returns ({split: metrics record}, the result split's per-example
      arrays for the report, which is refreshed only once the step is saved
      and ranked).
      """
      records, examples = {}, None
      for split in eval_splits:
        result = scoring.evaluate(state, eval_fn, config, mesh, split=split,
                                  collect=split == result_split,
                                  manifest=manifest)
        if split == result_split:
          examples = result.pop("examples", None)
        records[split] = log.write(split, step, **result)
        bar.write(f"eval {split} at step {step}: {_short(records[split])}")
        logging.info("eval %s at step %d: %s", split, step,
                     _short(records[split]))
      if jax.process_index() == 0:
        names = data.label_names(config.num_classes)
        log.image(f"{result_split}/confusion_matrix", step,
                  report.confusion_matrix_image(
                      records[result_split]["confusion_matrix"], names))
      return records, examples

    def measure_eval() -> float:
      """Seconds of one evaluation round as ``run_evals`` does it (for the
      time budget's plan): the selection split twice (the first pass
      compiles), the other splits by their size, the confusion-matrix image
      and the report (process 0's work, which every process waits for)."""
      scoring.evaluate(state, eval_fn, config, mesh, split=select_split,
                       manifest=manifest)
      t = time.perf_counter()
      result = scoring.evaluate(state, eval_fn, config, mesh,
                                split=select_split, collect=True,
                                manifest=manifest)
      seconds = time.perf_counter() - t
      sizes = {s: manifest["splits"][s].get("written") for s in eval_splits}
      if all(sizes.values()):
        seconds *= sum(sizes.values()) / sizes[select_split]
      else:
        seconds *= len(eval_splits)
      t = time.perf_counter()
      if jax.process_index() == 0:
        report.confusion_matrix_image(result["confusion_matrix"],
                                      data.label_names(config.num_classes))
        report.refresh(workdir, config, result.pop("examples", None),
                       manifest=manifest, selection_split=select_split)
      return seconds + time.perf_counter() - t

    def measure_save() -> float:
      """Saves ``step`` synchronously; its seconds."""
      nonlocal saved_step
      saved_step = step
      t = time.perf_counter()
      ckpt.save(step, state, train_iter, wait=True)
      return time.perf_counter() - t

    # What training evaluates, and the split of its result, confusion
    # matrix, report examples and summary: val, or the selection split when
    # val is left for after training.
    eval_splits = training_splits(config, select_split)
    result_split = "val" if "val" in eval_splits else select_split
    stopper = EarlyStopping(
        config, [r for r in log.read() if r["step"] <= step], select_split)
    history, last_eval, saved_step = [], None, latest
    wait, t0 = progress.DataWait(), time.perf_counter()
    while ((budget.measuring or step < run_config.total_steps)
           and not stopper.stopped and not budget.finished_early):
      with wait:
        batch = next(train_iter)
      state, m = train_fn(state, batch, budget.schedule,
                          train_backbone=optim.backbone_trainable(run_config,
                                                                  step))
      step += 1
      history.append(m)
      if budget.window_done(step, m, warm_up=measure_save):
        budget.make_plan(step, m, measure_eval=measure_eval,
                         measure_save=measure_save)
        run_config = budget.run_config
        bar.set_total(run_config.total_steps)
      last = not budget.measuring and step == run_config.total_steps
      if step % config.log_every_steps == 0 or last:
        summary = _summarize_train(history, step, time.perf_counter() - t0,
                                   len(history) * config.batch_size,
                                   wait.share())
        log.write("train", step, **summary)
        bar.update(step, loss=summary["loss"], lr=summary["learning_rate"],
                   images_per_sec=summary["examples_per_sec"],
                   data_wait=summary["input_wait_share"])
        logging.info("step %d: loss %.4f, accuracy %.3f, lr %.2e, %.1f "
                     "examples/s, input wait %.0f%%", step, summary["loss"],
                     summary["accuracy"], summary["learning_rate"],
                     summary["examples_per_sec"],
                     100 * summary["input_wait_share"])
        history, t0 = [], time.perf_counter()
      records = None
      eval_due = not budget.measuring and (
          step % run_config.eval_every_steps == 0 or last)
      # The budget is checked before the evaluation, which is then the
      # final one if the rest would not fit.
      budget_stop = budget.should_stop(step, eval_due, m)
      if eval_due or budget_stop:
        records, examples = run_evals(step)
        last_eval = records[result_split]
        budget.after_eval()
      # Every evaluated step is saved with its selection metrics, so the
      # best checkpoint is always one that exists.
      if (not budget.measuring and saved_step != step and (
          _save_due(step, run_config) or records)):
        ckpt.save(step, state, train_iter,
                  metrics=records[select_split] if records else None)
        saved_step = step
        budget.record_save(step)
      if records and jax.process_index() == 0:
        # After the save, which records this evaluation's rank in best.json:
        # the report's "Best checkpoint" then includes this evaluation.
        report.refresh(workdir, config, examples, manifest=manifest,
                       selection_split=select_split)
      if records and not last and not budget_stop and budget.replan(step):
        run_config = budget.run_config  # The pace seen: a new length.
        bar.set_total(run_config.total_steps)
      if records and stopper.update(step, records[select_split]):
        logging.warning(
            "Early stopping at step %d: %s on %s has not improved for %d "
            "evaluations (best %.4f at step %d).", step, stopper.metric,
            select_split, stopper.patience, stopper.best, stopper.best_step)
        last_eval = {**last_eval, "early_stopped": True}
        break
      if budget_stop:  # Evaluated and saved above; the save made synchronous.
        ckpt.wait()
        line = budget.stopped(step)
        logging.warning("%s", line)
        bar.write(line)
        break
      if stop.should_stop(step) and (budget.measuring
                                     or step < run_config.total_steps):
        if saved_step != step:
          ckpt.save(step, state, train_iter)
          budget.record_save(step)
        ckpt.wait()  # Synchronous: the process may be killed right after.
        logging.warning("Stopped by %s at step %d; checkpoint saved in %s.",
                        stop.signal_name, step, ckpt.directory)
        return {"preempted": True, "step": step, "signal": stop.signal_name}

    if last_eval is not None and not budget.finished_early:
      budget.finished(step)
    if last_eval is None:  # Already finished before this run: evaluate only.
      last_eval = {"split": result_split, "step": step,
                   **scoring.evaluate(state, eval_fn, config, mesh,
                                      split=result_split, manifest=manifest)}
      if not log.has(result_split, step):
        log.write(result_split, step, **{k: v for k, v in last_eval.items()
                                         if k not in ("split", "step")})
    if jax.process_index() == 0:
      best = _best_evaluation(ckpt, log.read(), select_split, result_split)
      if best:
        last_eval = {**last_eval, "best": best}
    if budget.result():
      last_eval = {**last_eval, "time_budget": budget.result()}
  return last_eval


def _save_due(step: int, config) -> bool:
  """A periodic save at ``step`` (every ``checkpoint_every_steps`` and the last)."""
  every = int(config.checkpoint_every_steps)
  return step == int(config.total_steps) or (every > 0 and step % every == 0)


def _best_evaluation(ckpt, records: list[dict], split: str,
                     result_split: str = "val") -> dict | None:
  """The best checkpoint, for the end-of-run summary (None if none is ranked).

  ``{"step", "metric", "split", "value", "val", "result"}``: the step
  ``best.json`` names, its value of the selection metric on ``split``, its
  ``val`` line of ``metrics.jsonl`` (None when val was not evaluated while
  training) and its ``result_split`` line (the run's result's split).
  """
  step = ckpt.best_step()
  if step is None:
    return None
  at_step = {r["split"]: r for r in records if r["step"] == step}
  metric = ckpt.best_metric
  return {"step": step, "metric": metric, "split": split,
          "value": at_step.get(split, {}).get(metric),
          "val": at_step.get("val"), "result": at_step.get(result_split)}


class EarlyStopping:
  """Stops after ``config.early_stopping_patience`` evaluations without improvement.

  Tracks ``config.checkpoint.best_metric`` on the selection split. Its history
  is rebuilt from ``metrics.jsonl`` on resume, so a preempted run stops where
  an uninterrupted one would.
  """

  def __init__(self, config, records: list[dict], split: str):
    self.metric = config.checkpoint.best_metric
    self.sign = 1.0 if config.checkpoint.best_mode == "max" else -1.0
    self.patience = int(config.early_stopping_patience)
    self.split = split
    self.best, self.best_step, self.bad = None, None, 0
    for r in records:
      if r["split"] == split:
        self.update(int(r["step"]), r)

  def update(self, step: int, record: dict) -> bool:
    """Feeds one evaluation; True when training should stop."""
    value = record.get(self.metric)
    if value is not None and np.isfinite(value) and (
        self.best is None or self.sign * (value - self.best) > 0):
      self.best, self.best_step, self.bad = float(value), step, 0
    else:
      self.bad += 1
    return self.stopped

  @property
  def stopped(self) -> bool:
    return self.patience > 0 and self.bad >= self.patience


def _short(record: dict) -> str:
  keys = ("loss", "accuracy", "macro_f1", "valence_ccc", "arousal_ccc")
  return ", ".join(f"{k}={record[k]:.4f}" for k in keys
                   if isinstance(record.get(k), float))
