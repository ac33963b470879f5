"""One way to open a run: config, contract, model and a chosen checkpoint.

The tools that start from a trained workdir (evaluate, predict, export) go
through ``open_run``: it reads ``W/config.json`` and the run's input/output
contract ``W/run_contract.json`` (the trainer writes both at start; see
``run_contract``: input size, crop margin, classes, class weights; the data
dir is needed only to evaluate a split), builds the abstract train state the trainer builds (``train_state``: shapes,
dtypes, replicated shardings; no ImageNet download, no real initialization),
and restores the chosen checkpoint onto it. The trainer and the tools name
the workdir's files through the constants here and save and restore with
the same ``checkpointer``.

Checkpoint choice (``--checkpoint``): ``best`` (the best step by
``config.checkpoint.best_metric``; falls back to ``latest``, with a warning,
when no step was saved with metrics), ``latest``, or a step number.

A workdir is any ``etils.epath`` path (local or ``gs://...``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import urllib.parse

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from affectjax import checkpoint as ckpt_lib
from affectjax import config_base
from affectjax import run_contract
from affectjax import sharding
from affectjax import train_state

CONFIG_NAME = "config.json"
CHECKPOINTS = "checkpoints"


def path(workdir) -> epath.Path:
  """The workdir as an epath: ``~`` expanded, ``file:///abs/dir`` made a path.

  etils.epath knows gs://, s3://, az:// but not file:// URLs; every entry
  point (training included) opens its workdir through here.
  """
  text = os.fspath(workdir) if not isinstance(workdir, str) else workdir
  if text.startswith("file://"):
    parsed = urllib.parse.urlparse(text)
    if parsed.netloc not in ("", "localhost"):
      raise ValueError(f"--workdir={text}: a file:// URL names a local path "
                       "(file:///abs/path); use the path itself.")
    text = urllib.parse.unquote(parsed.path)
  return epath.Path(text).expanduser()


def _merge(base: dict, loaded: dict) -> dict:
  """``loaded`` over ``base``, recursively (fields added since the run keep
  their defaults; JSON lists stand in for tuples)."""
  out = dict(base)
  for key, value in loaded.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      out[key] = _merge(base[key], value)
    else:
      out[key] = value
  return out


def load_config(workdir) -> ml_collections.ConfigDict:
  """The run's ``config.json`` over today's defaults."""
  p = path(workdir) / CONFIG_NAME
  if not p.exists():
    raise FileNotFoundError(
        f"{p} not found: --workdir must be a training workdir (the trainer "
        "writes config.json there at start). `./launch.sh demo` makes "
        "runs/demo.")
  try:
    loaded = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p} is not valid JSON ({e}); restore it from the "
                     "training command's config.") from e
  base = config_base.get_base_config().to_dict()
  return ml_collections.ConfigDict(_merge(base, loaded))


def checkpointer(workdir, config) -> ckpt_lib.Checkpointer:
  """The trainer's Checkpointer over ``W/checkpoints`` (same keep/best options)."""
  return ckpt_lib.Checkpointer(
      path(workdir) / CHECKPOINTS, every_steps=config.checkpoint_every_steps,
      keep=int(config.keep_checkpoints),
      best_metric=config.checkpoint.best_metric or None,
      best_mode=config.checkpoint.best_mode,
      global_batch_size=int(config.batch_size))


def resolve_step(ckpt: ckpt_lib.Checkpointer, which: str | int) -> tuple[int, str]:
  """``best`` | ``latest`` | step -> (step, label for output names)."""
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(
        f"{ckpt.directory} holds no checkpoint yet; train first (or wait for "
        "the first save).")
  which = str(which)
  if which == "best":
    step = ckpt.best_step()
    if step is not None:
      return step, "best"
    logging.warning("No checkpoint in %s was saved with evaluation metrics; "
                    "using the latest (step %d) instead of 'best'.",
                    ckpt.directory, steps[-1])
    return steps[-1], "latest"
  if which == "latest":
    return steps[-1], "latest"
  try:
    step = int(which)
  except ValueError:
    raise ValueError(f"--checkpoint={which!r}: use best, latest or a step "
                     f"number (available: {steps}).") from None
  if step not in steps:
    raise FileNotFoundError(f"--checkpoint={step}: no such step in "
                            f"{ckpt.directory}; available: {steps}.")
  return step, str(step)


@dataclasses.dataclass
class Run:
  """An opened run: config, contract, model graph, restored state and where
  it came from."""
  workdir: epath.Path
  config: ml_collections.ConfigDict
  contract: run_contract.Contract
  graphdef: nnx.GraphDef
  state: dict
  step: int
  label: str  # 'best' | 'latest' | the step number, for output names.
  mesh: jax.sharding.Mesh
  _eval_fns: dict = dataclasses.field(default_factory=dict, repr=False)

  def eval_fn(self, tta: str = "none", use_ema: bool = True):
    """The jitted eval step for this run (compiled once per (tta, use_ema)).

    Its loss uses the run's class weights (its own training data's), never
    those of another ``--data_dir`` it is evaluated on.
    """
    from affectjax import scoring  # pylint: disable=g-import-not-at-top
    key = (tta, use_ema)
    if key not in self._eval_fns:
      self._eval_fns[key] = scoring.make_eval_step(
          self.graphdef, self.config, self.mesh, self.class_weights(),
          tta=tta, use_ema=use_ema)
    return self._eval_fns[key]

  def class_weights(self):
    """The loss's class weights the run trained with (None when off).

    Only a run that predates its contract and whose data dir is gone lacks
    them; its evaluation then weights by the data it evaluates, with a
    warning.
    """
    weights = self.contract.class_weights_array()
    if weights is None and self.contract.class_weighting != "none":
      logging.warning("%s does not record its class weights; the loss uses "
                      "weights from %s.", self.workdir, self.config.data.dir)
      return train_state.class_weights(self.config)
    return weights

  def weights(self, use_ema: bool = True) -> dict:
    """``{"params", "rest"}``: the EMA weights by default when present."""
    from affectjax import scoring  # pylint: disable=g-import-not-at-top
    return scoring.eval_weights(self.state, use_ema)

  def model(self, use_ema: bool = True) -> nnx.Module:
    w = self.weights(use_ema)
    return nnx.merge(self.graphdef, w["params"], w["rest"])


def open_run(workdir, *, checkpoint: str | int = "best", data_dir: str | None = None,
             mesh=None) -> Run:
  """Reads the config and contract and restores ``checkpoint`` (replicated
  on ``mesh``). ``data_dir`` replaces ``config.data.dir`` (the data to
  evaluate); the contract stays the run's own."""
  config = load_config(workdir)
  contract = run_contract.load(path(workdir), config)
  if data_dir:
    config.data.dir = str(data_dir)
  mesh = sharding.make_mesh() if mesh is None else mesh
  ckpt = checkpointer(workdir, config)
  try:
    step, label = resolve_step(ckpt, checkpoint)
    graphdef, abstract, _ = train_state.abstract_state(config, mesh)
    state = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  logging.info("Opened %s at step %d (%s)", workdir, step, label)
  return Run(workdir=path(workdir), config=config, contract=contract,
             graphdef=graphdef,
             state=state, step=step, label=label, mesh=mesh)
