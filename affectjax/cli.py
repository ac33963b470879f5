"""What the command-line tools share: quiet library logs, mistakes in one line.

Every entry point (``main``, ``evaluate``, ``predict``, ``export``) runs its
``main(argv)`` through ``tool``::

  app.run(cli.tool(main, "affectjax.evaluate"))

which, once the flags are parsed:

* keeps third-party INFO logging out of the output. Orbax, Grain and JAX log
  their internals at INFO (handler registries, read throughput, metadata
  stores closing); a tool's output is its own progress and its result. Their
  WARNINGs and errors still show. ``--verbosity=N`` (any N, 0 included) or
  ``--alsologtostderr`` brings their INFO lines back.
* prints a user's mistake as one line, ``<tool>: <message>``, with no
  traceback, and exits with status 2 (``USAGE_ERROR``). A mistake is an
  ``OSError`` (a missing config file, workdir or manifest, a full disk), or a
  ``ValueError`` raised by affectjax's or data_prep's own code (those carry
  a message naming the flag or file and what to do). A ``ValueError`` from
  inside a library is most likely a bug and keeps its traceback; with
  ``--verbosity`` given, every error keeps it.
"""
from __future__ import annotations

import functools
import logging as std_logging
import os
import sys
import traceback
from typing import Callable

from absl import flags
from absl import logging

USAGE_ERROR = 2
# Source trees whose INFO lines are a tool's own progress.
_OWN_CODE = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 package) + os.sep
    for package in ("affectjax", "data_prep"))


def _own(filename: str | None) -> bool:
  return bool(filename) and os.path.abspath(filename).startswith(_OWN_CODE)


class QuietLibraries(std_logging.Filter):
  """Lets a record through if it is a WARNING or worse, or logged by our code."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or _own(record.pathname)


def _verbose() -> bool:
  """Whether the user asked for library logging (``--verbosity``,
  ``--alsologtostderr``)."""
  f = flags.FLAGS
  return bool((f["verbosity"].present if "verbosity" in f else False)
              or f.get_flag_value("alsologtostderr", False))


def quiet_libraries() -> QuietLibraries | None:
  """Installs ``QuietLibraries`` on absl's handler (which every Python logger
  reaches) unless the user asked for library logs; returns it, or None."""
  if _verbose():
    return None
  handler = logging.get_absl_handler()
  for existing in handler.filters:
    if isinstance(existing, QuietLibraries):
      return existing
  quiet = QuietLibraries()
  handler.addFilter(quiet)
  return quiet


def is_user_error(error: BaseException) -> bool:
  """An ``OSError``, or a ``ValueError`` our own code raised (see the module doc)."""
  if isinstance(error, OSError):
    return True
  if isinstance(error, ValueError):
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and _own(frames[-1].filename)
  return False


def tool(main: Callable[[list[str]], int | None], name: str
         ) -> Callable[[list[str]], int | None]:
  """``main`` with quiet library logs and one-line user mistakes (for
  ``app.run``)."""

  @functools.wraps(main)
  def wrapped(argv):
    quiet_libraries()
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if _verbose() or not is_user_error(e):
        raise
      sys.stdout.flush()
      print(f"{name}: {e}", file=sys.stderr, flush=True)
      return USAGE_ERROR

  return wrapped
