"""The one place affectjax reaches into Orbax's private modules, guarded.

A failed save must release Orbax's writer threads (``release_waiting_writers``),
and there is no public API for that: the writers wait on "directory created"
signals keyed by Orbax's operation id, in ``orbax.checkpoint._src.futures``.
Everything that touches those internals is here, and every use degrades
instead of failing: if Orbax moves them, a successful save stays successful
(the operation id is just not recorded) and a failed save still raises its
own error (its writer threads may then linger until Orbax's timeout). A
warning names the missing piece once.

``check()`` imports every internal used here and raises if one is gone;
``tests/test_checkpoint.py`` calls it, so an Orbax upgrade that moves them
fails the suite loudly. ``setup.cfg`` pins orbax-checkpoint to the 0.12 series,
the one the tests run.
"""
from __future__ import annotations

from absl import logging

_warned: set[str] = set()


def _modules():
  """Orbax's private modules used here (ImportError if moved)."""
  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.futures import future
  from orbax.checkpoint._src.futures import signaling_client
  from orbax.checkpoint._src.futures import synchronization
  # pylint: enable=g-import-not-at-top
  return future, signaling_client, synchronization


def check() -> None:
  """Raises (naming what is missing) unless every internal used here exists."""
  future, signaling_client, synchronization = _modules()
  needed = {
      "synchronization.OperationIdGenerator.get_current_operation_id":
          getattr(synchronization.OperationIdGenerator,
                  "get_current_operation_id", None),
      "synchronization.HandlerAwaitableSignal.STEP_DIRECTORY_CREATION":
          getattr(synchronization.HandlerAwaitableSignal,
                  "STEP_DIRECTORY_CREATION", None),
      "synchronization.HandlerAwaitableSignal.ITEM_DIRECTORY_CREATION":
          getattr(synchronization.HandlerAwaitableSignal,
                  "ITEM_DIRECTORY_CREATION", None),
      "future.AwaitableSignalsContract.get_unique_awaitable_singal_key":
          getattr(future.AwaitableSignalsContract,
                  "get_unique_awaitable_singal_key", None),
      "signaling_client.get_signaling_client":
          getattr(signaling_client, "get_signaling_client", None),
  }
  missing = [name for name, value in needed.items() if value is None]
  if missing:
    raise AttributeError(
        "orbax.checkpoint._src.futures no longer has "
        f"{', '.join(missing)}; update affectjax/orbax_internals.py for this "
        "Orbax version.")


def _warn_once(what: str, error: Exception) -> None:
  if what not in _warned:
    _warned.add(what)
    logging.warning("Orbax internals changed (%s: %s: %s); affectjax cannot "
                    "%s with this Orbax version.", what,
                    type(error).__name__, error,
                    "release the writer threads of a failed save")


def current_operation_id() -> str | None:
  """Orbax's id of the save just started, or None if it cannot be read."""
  try:
    _, _, synchronization = _modules()
    return synchronization.OperationIdGenerator.get_current_operation_id()
  except Exception as e:  # pylint: disable=broad-except
    _warn_once("OperationIdGenerator", e)
    return None


def release_waiting_writers(operations: list[str | None]) -> None:
  """Lets the writer threads of a failed save finish instead of waiting.

  Orbax's writers wait for a "directory created" signal before writing; when
  the directory cannot be created (a full or read-only disk) the signal never
  comes and they wait out Orbax's async timeout (minutes). They are not
  daemon threads, so the process could not exit with its error until then.
  Sending the signal lets them run, fail on the same disk and end.
  ``operations``: the ids ``current_operation_id`` returned for the saves
  that may be in flight (Nones are skipped); the current one is added.
  """
  try:
    future, signaling_client, synchronization = _modules()
    client = signaling_client.get_signaling_client()
    ids = [*operations,
           synchronization.OperationIdGenerator.get_current_operation_id()]
    for operation in dict.fromkeys(i for i in ids if i is not None):
      for signal in (
          synchronization.HandlerAwaitableSignal.STEP_DIRECTORY_CREATION,
          synchronization.HandlerAwaitableSignal.ITEM_DIRECTORY_CREATION):
        client.key_value_set(
            future.AwaitableSignalsContract.get_unique_awaitable_singal_key(
                signal, operation), "released after a failed save",
            allow_overwrite=True)
  except Exception as e:  # pylint: disable=broad-except
    _warn_once("release_waiting_writers", e)
