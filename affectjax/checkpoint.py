"""One Orbax manager for the train state and the Grain iterator.

A checkpoint step directory holds two items:
  * ``state``: the train-state pytree (params, BatchNorm statistics, optimizer
    state, step), saved asynchronously;
  * ``data``: the Grain iterator position of every process, so a resumed run
    sees exactly the batches an uninterrupted one would have seen.

Orbax writes each step under a temporary name and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every ``every_steps`` (and on demand), keeps the latest ``keep``."""

  def __init__(self, directory: str, *, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every_steps > 0
                                   and step % self.every_steps == 0)

  def save(self, step: int, state: Any, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator=None):
    """Restores ``step`` onto ``abstract_state`` (shapes, dtypes, shardings).

    Restoring onto an abstract target is what keeps container types intact:
    without it, Orbax hands optax's namedtuple states back as plain lists.
    The data iterator, if given, is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until any asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, for restoring."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
