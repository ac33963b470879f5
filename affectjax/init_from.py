"""Fine-tuning a trained run: the new run's first state from another run's weights.

``--config.init_from=WORKDIR`` (local or gs://) with
``--config.init_checkpoint=best|latest|STEP`` and ``--config.init_use_ema``.
The trainer calls ``start`` once, when its own workdir has no checkpoint
(a resume never reads the source again; the start is recorded in the run's
contract, ``run_contract.json``'s ``init_from``):

  * the source is opened the way every tool opens a run
    (``workdir.open_run``: its config, contract, abstract state, the
    checkpoint chosen by ``workdir.resolve_step``);
  * the backbone's weights and BatchNorm statistics, and the head's hidden
    layer, are copied exactly; the model and its widths must be the
    source's, else the run stops naming both (exit 2); so must
    ``model.kwargs.head_hidden`` (the hidden layer is the head's trained
    part: a different size stops the run rather than silently dropping it);
  * the expression head's columns (``expression.kernel`` [hidden, classes]
    and its bias) are carried for the classes both runs name
    (``scoring.ClassMatch``, the by-name matching of cross-dataset
    evaluation); a class the source lacks (7 -> 8: contempt) keeps this
    run's fresh initialization, one the new run lacks (8 -> 7) is dropped;
  * the valence/arousal head's column of each target is carried only where
    the source learned it (its contract's ``valence_arousal`` record; a
    source from before the record is checked against its data dir when that
    still exists, else its head starts fresh, with a warning);
  * step, optimizer state and data position start anew (step 0, the new
    config's optimizer, the first batch of the new data); the EMA starts at
    the carried weights.

Any image size works (every model ends in global average pooling), and the
transfer modes (``frozen``, ``two_phase``, ``full``) treat the carried
backbone as they treat ImageNet weights.
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from absl import logging

from affectjax import data
from affectjax import run_contract
from affectjax import scoring
from affectjax import sharding
from affectjax import train_state
from affectjax import workdir as workdir_lib

_EXPRESSION = ("head", "expression")
_VALENCE_AROUSAL = ("head", "valence_arousal")
_HIDDEN = ("head", "hidden")
_HEAD_KWARGS = ("dropout", "head_hidden")
VA_TARGETS = ("valence", "arousal")


class InitFromError(ValueError):
  """A source run this run cannot start from (exit 2: change the command)."""


def _key_name(key) -> str | None:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      value = getattr(key, attr)
      return None if value == "value" and attr == "name" else str(value)
  return str(key)


def _path(path) -> tuple[str, ...]:
  """A pytree path as names (``("head", "expression", "kernel")``)."""
  return tuple(n for n in (_key_name(k) for k in path) if n is not None)


def _leaves(tree) -> dict[tuple[str, ...], jax.Array]:
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shapes(weights: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {(part,) + name: tuple(x.shape)
          for part in ("params", "rest")
          for name, x in _leaves(weights[part]).items()}


def _under(name: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
  return name[1:1 + len(prefix)] == prefix


def _architecture(config) -> str:
  """``custom_cnn(widths=(32, 64), ...)``: the model and its backbone kwargs."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in dict(config.model.kwargs).items()
            if k not in _HEAD_KWARGS}
  return (f"{config.model.name}("
          + ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) + ")")


def _hidden_units(shapes: dict) -> int:
  kernel = shapes.get(("params",) + _HIDDEN + ("kernel",))
  return 0 if kernel is None else kernel[-1]


def check_architecture(source_config, config, source_shapes: dict,
                       shapes: dict, where: str) -> None:
  """Refuses another model, another width, or another head hidden size.

  Shapes decide (every carried array must have the target's shape); the
  message names both architectures by their configs.
  """
  head = lambda n: _under(n, _EXPRESSION) or _under(n, _VALENCE_AROUSAL)
  body = lambda s: {n: v for n, v in s.items() if not _under(n, ("head",))}
  if (source_config.model.name != config.model.name
      or body(source_shapes) != body(shapes)):
    raise InitFromError(
        f"--config.init_from={where} trained {_architecture(source_config)}, "
        f"but this run builds {_architecture(config)}; a fine-tune keeps the "
        "source's model and widths: set --config.model.name and "
        "--config.model.kwargs as in its config.json, or drop "
        "--config.init_from.")
  hidden = {n: v for n, v in source_shapes.items()
            if _under(n, ("head",)) and not head(n)}
  if hidden != {n: v for n, v in shapes.items()
                if _under(n, ("head",)) and not head(n)}:
    src, new = _hidden_units(source_shapes), _hidden_units(shapes)
    raise InitFromError(
        f"--config.init_from={where} has a head with {src} hidden units, this "
        f"run {new} (model.kwargs.head_hidden); the hidden layer is the "
        "head's trained part, so pass "
        f"--config.model.kwargs.head_hidden={src} to fine-tune it.")


def learned_valence_arousal(source) -> tuple[tuple[bool, bool], str]:
  """(valence, arousal) the source learned, and where that was read from."""
  learned = source.contract.learned_valence_arousal()
  if learned is not None:
    return learned, "its run_contract.json"
  try:
    manifest = data.read_manifest(source.config.data.dir)
    record = run_contract.valence_arousal_record(source.config, manifest)
  except (OSError, ValueError) as e:
    logging.warning(
        "%s does not record whether its data had valence/arousal (it "
        "predates the record) and its data dir %s cannot be read (%s): "
        "the valence/arousal head starts fresh.", source.workdir,
        source.config.data.dir, e)
    return (False, False), "unknown (not recorded; data dir unreadable)"
  return ((record["learned"]["valence"], record["learned"]["arousal"]),
          f"its data dir {source.config.data.dir} (not recorded in the run)")


def _weights_sha256(weights: dict) -> str:
  """sha256 over the taken weights, in path order (names, dtypes, bytes)."""
  h = hashlib.sha256()
  for part in ("params", "rest"):
    for name, x in sorted(_leaves(weights[part]).items()):
      host = np.asarray(x.addressable_data(0))
      h.update(json.dumps([part, name, str(host.dtype), host.shape]).encode())
      h.update(np.ascontiguousarray(host).tobytes())
  return h.hexdigest()


def _merge(source: dict, fresh: dict, expression: tuple, va: tuple, mesh):
  """The new ``{"params", "rest"}``: ``source``'s arrays, except the
  expression and valence/arousal columns the plan leaves fresh (one jitted
  gather, replicated on ``mesh``)."""
  (src_cols, new_cols), va_cols = expression, np.flatnonzero(va)

  def merge(source, fresh):
    src = {part: _leaves(source[part]) for part in ("params", "rest")}

    def leaf(part):
      def take(path, x):
        name = _path(path)
        if name[:2] == _EXPRESSION:
          return x.at[..., new_cols].set(src[part][name][..., src_cols])
        if name[:2] == _VALENCE_AROUSAL:
          return x.at[..., va_cols].set(src[part][name][..., va_cols])
        return src[part][name]
      return take

    return {part: jax.tree_util.tree_map_with_path(leaf(part), fresh[part])
            for part in ("params", "rest")}

  return jax.jit(merge, out_shardings=sharding.replicated(mesh))(
      source, fresh)


def start(config, workdir, state: dict, tx, mesh, manifest: dict) -> dict:
  """The new run's step-0 state from ``config.init_from`` (see module doc).

  ``state`` is the freshly initialized state (its head columns that are not
  carried keep their values); the source's start is added to the run's
  contract. Raises ``InitFromError`` (exit 2) for a source that is not a
  run or does not fit, ``FileNotFoundError`` for a checkpoint it lacks.
  """
  where = str(config.init_from)
  src_dir = workdir_lib.path(where)
  if not (src_dir / workdir_lib.CONFIG_NAME).exists():
    raise InitFromError(
        f"--config.init_from={where}: no {workdir_lib.CONFIG_NAME} there; "
        "it must be the --workdir of a training run.")
  try:
    source = workdir_lib.open_run(src_dir, checkpoint=config.init_checkpoint,
                                  mesh=mesh)
  except (FileNotFoundError, ValueError) as e:
    if not isinstance(e, FileNotFoundError) and "--checkpoint=" not in str(e):
      raise
    # workdir.resolve_step names the tools' flag; this run's is another.
    raise type(e)(f"--config.init_from={where}: " + str(e).replace(
        "--checkpoint=", "--config.init_checkpoint=")) from None
  use_ema = bool(config.init_use_ema) and "ema" in source.state
  taken = scoring.eval_weights(source.state, use_ema)
  fresh = {"params": state["params"], "rest": state["rest"]}
  check_architecture(source.config, config, _shapes(taken), _shapes(fresh),
                     where)

  names = run_contract.class_names(config, manifest)
  match = scoring.ClassMatch(model=names, data=source.contract.class_names)
  expression = (np.asarray([source.contract.class_names.index(n)
                            for n in match.compared], np.int64),
                np.asarray([names.index(n) for n in match.compared], np.int64))
  va, va_source = learned_valence_arousal(source)
  params_rest = _merge(taken, fresh, expression, va, mesh)
  new_state = train_state.state_from_weights(
      config, tx, params_rest["params"], params_rest["rest"], mesh)

  left_out = match.left_out
  record = {
      "workdir": str(src_dir), "checkpoint": source.label,
      "step": int(source.step), "ema": use_ema,
      "model": _architecture(source.config),
      "data_dir": source.contract.data_dir,
      "data_fingerprint": source.contract.data_fingerprint,
      "weights_sha256": _weights_sha256(taken),
      "classes": {
          "carried": list(match.compared),
          "new": [n for n, r in left_out.items() if r == "not in the data"],
          "dropped": [n for n, r in left_out.items()
                      if r == "not in the model"]},
      "valence_arousal": {
          **{t: "carried" if v else "fresh" for t, v in zip(VA_TARGETS, va)},
          "source_learned_from": va_source},
  }
  run_contract.record_start(workdir, record)
  logging.info(
      "Started from %s at step %d (%s checkpoint%s): classes carried %s%s%s; "
      "valence/arousal head %s.", src_dir, source.step, source.label,
      ", EMA weights" if use_ema else "", ", ".join(match.compared),
      "; new: " + ", ".join(record["classes"]["new"])
      if record["classes"]["new"] else "",
      "; dropped: " + ", ".join(record["classes"]["dropped"])
      if record["classes"]["dropped"] else "",
      ", ".join(f"{t} {s}" for t, s in record["valence_arousal"].items()
                if t in VA_TARGETS))
  return new_state


def describe(record: dict | None) -> str | None:
  """One line saying where a fine-tuned run started (None: from scratch or
  ImageNet), for ``evaluate`` and the report."""
  if not record:
    return None
  classes = record.get("classes", {})
  va = record.get("valence_arousal", {})
  extra = []
  if classes.get("new"):
    extra.append("new classes: " + ", ".join(classes["new"]))
  if classes.get("dropped"):
    extra.append("dropped: " + ", ".join(classes["dropped"]))
  extra.append("valence/arousal: " + ", ".join(
      f"{t} {va.get(t, '?')}" for t in VA_TARGETS))
  return (f"Fine-tuned from {record.get('workdir')} at step "
          f"{record.get('step')} ({record.get('checkpoint')} checkpoint"
          + (", EMA weights" if record.get("ema") else "") + "; "
          + "; ".join(extra) + ").")
