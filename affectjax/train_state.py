"""The model and the train state a config describes, built the same way everywhere.

The trainer builds the real state (``init_state``); ``workdir.open_run`` and
the tools after training build only its shapes (``abstract_state``) to
restore a checkpoint onto. Both go through ``build_model`` and ``_state``
here, so a restored run has exactly the trainer's structure.

  compute_dtype(config)         'auto' -> bfloat16 on GPU/TPU, float32 on CPU
  abstract_state(config, mesh)  (graphdef, ShapeDtypeStructs, tx); allocates nothing
  init_state(config, mesh)      (graphdef, replicated state, tx); one jitted
                                init, ImageNet arrays placed once when
                                ``config.model.init == 'imagenet'``
  state_from_weights(config, tx, params, rest, mesh)
                                a step-0 state around given weights (fresh
                                optimizer and EMA); ``init_from`` uses it
  class_weights(config, manifest)  the loss's class weights, or None

The state is ``{"step", "params", "rest", "opt_state"}`` (+ ``"ema":
{"params", "rest"}`` when ``config.ema_decay > 0``); ``params`` and ``rest``
(BatchNorm statistics) come from ``nnx.split(model, nnx.Param, ...)``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from affectjax import data
from affectjax import losses
from affectjax import models
from affectjax import optim
from affectjax import sharding

State = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_INITS = ("scratch", "imagenet")


def compute_dtype(config) -> jnp.dtype:
  """``config.model.dtype``, with 'auto' = bfloat16 on GPU/TPU, float32 on CPU."""
  name = config.model.dtype
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if name not in _DTYPES:
    raise ValueError(f"--config.model.dtype={config.model.dtype!r}: use "
                     f"'auto' or one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def check_model_config(config) -> None:
  """Rejects an unknown ``config.model.dtype`` or ``config.model.init``, and
  ``config.init_from`` beside ImageNet weights or with a bad
  ``config.init_checkpoint`` (before any weight file is fetched)."""
  compute_dtype(config)
  if config.model.init not in _INITS:
    raise ValueError(f"--config.model.init={config.model.init!r}: use "
                     f"one of {_INITS}.")
  init_from = config.get("init_from", "")
  if not init_from:
    return
  if config.model.init == "imagenet":
    raise ValueError(
        f"--config.init_from={init_from} and --config.model.init=imagenet "
        "both say where the weights come from; pass "
        "--config.model.init=scratch to start from that run (its backbone "
        "already holds whatever it started from).")
  which = str(config.init_checkpoint)
  if which not in ("best", "latest") and not which.isdigit():
    raise ValueError(f"--config.init_checkpoint={which!r}: use best, latest "
                     "or a step number of the --config.init_from run.")


def build_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """``config.model.name`` with its random initialization (no weight file)."""
  return models.create(
      config.model.name, rngs=nnx.Rngs(config.seed),
      num_classes=config.num_classes, dtype=compute_dtype(config),
      **dict(config.model.kwargs))


def _state(config, tx, params, rest) -> State:
  """The train state around model weights (step 0, fresh optimizer, EMA copy)."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
           "opt_state": tx.init(params)}
  if config.ema_decay > 0:
    state["ema"] = {"params": params, "rest": rest}
  return state


def abstract_state(config: ml_collections.ConfigDict, mesh
                   ) -> tuple[nnx.GraphDef, State, optax.GradientTransformation]:
  """(graphdef, abstract train state with replicated shardings, optimizer).

  Nothing is allocated: this is what checkpoints are restored onto.
  """
  check_model_config(config)
  graphdef, params, rest = nnx.split(
      nnx.eval_shape(lambda: build_model(config)), nnx.Param, ...)
  tx = optim.create(config, params)
  repl = sharding.replicated(mesh)
  shapes = jax.eval_shape(functools.partial(_state, config, tx), params, rest)
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
  return graphdef, abstract, tx


def init_state(config: ml_collections.ConfigDict, mesh
               ) -> tuple[nnx.GraphDef, State, optax.GradientTransformation]:
  """Creates the replicated train state on ``mesh`` with jitted inits.

  The random initialization runs compiled, with ``out_shardings``
  replicated (not hundreds of eager ops and per-array transfers). With
  ``config.model.init='imagenet'`` the converted host arrays replace the
  backbone's and are placed once, before the optimizer state is built.
  """
  check_model_config(config)
  repl = sharding.replicated(mesh)
  weights_path = None
  if config.model.init == "imagenet":  # A missing file fails before compiling.
    weights_path = models.imagenet_weights_path(config.model.name,
                                                config.model.weights_dir)

  @functools.partial(jax.jit, out_shardings=repl)
  def init_weights():
    return nnx.split(build_model(config), nnx.Param, ...)[1:]

  abstract_model = nnx.eval_shape(lambda: build_model(config))
  graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  params, rest = init_weights()
  tx = optim.create(config, params)
  if weights_path is not None:
    from affectjax.models import imagenet  # pylint: disable=g-import-not-at-top
    arrays = imagenet.load_arrays(abstract_model, weights_path)
    params, rest = jax.device_put(
        imagenet.merge_arrays((params, rest), arrays), repl)
    logging.info("Loaded ImageNet weights from %s", weights_path)
  return graphdef, state_from_weights(config, tx, params, rest, mesh), tx


def state_from_weights(config, tx: optax.GradientTransformation, params,
                       rest, mesh) -> State:
  """The step-0 train state around ``params`` and ``rest`` (BatchNorm
  statistics), replicated on ``mesh``: a fresh optimizer state and, when
  ``config.ema_decay > 0``, an EMA that starts at these weights."""
  return jax.jit(functools.partial(_state, config, tx),
                 out_shardings=sharding.replicated(mesh))(params, rest)


def class_weights(config, manifest: dict | None = None) -> np.ndarray | None:
  """CE class weights from the prepared data's training histogram, per
  ``config.loss.class_weighting`` (None when off). Evaluation reuses it so its
  loss is the trainer's."""
  if config.loss.class_weighting == "none":
    return None
  if manifest is None:
    manifest = data.read_manifest(config.data.dir)
  counts = manifest["splits"]["train"]["class_counts"]
  return np.asarray(losses.class_weights_from_counts(
      counts, mode=config.loss.class_weighting), np.float32)
