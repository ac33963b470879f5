"""Orbax's and asyncio's reports of a failed save or restore, routed to the log.

When a save fails (a full disk, say), Orbax logs an ERROR with a traceback
from each of its writer threads, asyncio reports every abandoned write, and
Python prints each coroutine closed half-way; ``affectjax.checkpoint`` turns
the failure into one clear message (``CheckpointWriteError``), so all of
those are detail: they go to the log at INFO or DEBUG, shown with
``--verbosity`` (see ``affectjax.cli``). Also: Orbax's warning for a save
without metrics while best-keeping is on, which is every periodic save.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

from absl import logging

class _DropUntrackedSaveWarning(std_logging.Filter):
  """Drops Orbax's warning for a save without metrics.

  Orbax warns "Requested `tracked_metric`; did not provide metrics." at
  every save without ``metrics=`` once a ``best_fn`` is set; here that is
  every periodic save that is not an evaluation, which is by design.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


class _OrbaxTracebacksAtInfo(std_logging.Filter):
  """Logs Orbax's tracebacks of a failed save or restore at INFO.

  Orbax logs an ERROR with a traceback from each background thread of a
  failed save (30 lines for one full disk), then raises the error where the
  save is waited for; ``Checkpointer`` turns that into one clear message
  (``CheckpointWriteError``), so the tracebacks are detail: at INFO they
  show with ``--verbosity=0`` (see ``affectjax.cli``).
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.levelno == std_logging.ERROR and record.exc_info
        and f"{os.sep}orbax{os.sep}" in (record.pathname or "")):
      record.levelno, record.levelname = std_logging.INFO, "INFO"
    return True


class _AbandonedWritesAtInfo(std_logging.Filter):
  """asyncio's "exception was never retrieved" reports, at INFO.

  When one write of a save fails, Orbax stops waiting for the others; they
  fail on the same disk a moment later, and asyncio reports each of them
  (with a traceback) when it is collected, often after the run's message.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.levelno >= std_logging.ERROR and "exception was never "
        "retrieved" in str(record.msg).split("\n", 1)[0]):
      record.levelno, record.levelname = std_logging.INFO, "INFO"
    return True


def _abandoned(unraisable) -> bool:
  """Whether an unraisable exception is an abandoned read or write's:
  tensorstore completing it on an event loop Orbax already closed, or an
  Orbax coroutine closed half-way after another read or write failed."""
  if (unraisable.exc_type is RuntimeError
      and str(unraisable.exc_value) == "Event loop is closed"):
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _closed_loop_reports_at_debug() -> None:
  """The abandoned reads and writes of a failed save or restore go to the log
  at DEBUG (``--verbosity=1``).

  When one write (or read) of a step fails, Orbax stops waiting for the
  others; they end a moment later and Python reports each through
  ``sys.unraisablehook`` as a bare traceback on stderr ("RuntimeError: Event
  loop is closed", "Exception ignored in: <coroutine ...>"), dozens for one
  full disk. Anything else reaches the previous hook unchanged.
  """
  previous = sys.unraisablehook
  if getattr(previous, "affectjax_abandoned_io", False):
    return

  def hook(unraisable):
    if not _abandoned(unraisable):
      previous(unraisable)
      return
    logging.debug("A read or write abandoned after another failed: %s",
                  unraisable.exc_value, exc_info=(
                      unraisable.exc_type, unraisable.exc_value,
                      unraisable.exc_traceback))

  hook.affectjax_abandoned_io = True
  sys.unraisablehook = hook


def library_noise_at_info() -> None:
  """The reports of a failed save's pieces go to the log (Orbax's and
  asyncio's at INFO, shown with ``--verbosity=0``; the abandoned writes' at
  DEBUG); ``CheckpointWriteError`` is the one clear message."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _OrbaxTracebacksAtInfo) for f in logger.filters):
    logger.addFilter(_OrbaxTracebacksAtInfo())
  logger = std_logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedWritesAtInfo) for f in logger.filters):
    logger.addFilter(_AbandonedWritesAtInfo())
  _closed_loop_reports_at_debug()


@contextlib.contextmanager
def without_untracked_save_warning():
  logger = logging.get_absl_logger()
  quiet = _DropUntrackedSaveWarning()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)
