"""What the command-line tools share: quiet library logs, exit statuses a
failure policy can trust.

Every entry point (``main``, ``evaluate``, ``predict``, ``export``) runs its
``main(argv)`` through ``tool``::

  app.run(cli.tool(main, "affectjax.evaluate"))

which, once the flags are parsed:

* runs XLA:CPU's convolutions in Eigen (``xla_cpu.configure``: measured
  faster than its YNNPACK default; a user's own ``XLA_FLAGS`` setting wins).
  (Keeping XLA:CPU's step buffers in the process, ``host_malloc``, is done
  earlier, by ``import affectjax``.)
* keeps third-party INFO logging out of the output. Orbax, Grain and JAX log
  their internals at INFO (handler registries, read throughput, metadata
  stores closing); a tool's output is its own progress and its result. Their
  WARNINGs and errors still show. ``--verbosity=N`` (any N, 0 included) or
  ``--alsologtostderr`` brings their INFO lines back.
* exits with a status that says what to do next:

  - 2 (``USAGE_ERROR``), "fix the command": a deliberate report of a mistake
    in the command, printed as one line ``<tool>: <message>`` without a
    traceback. That is an ``absl.app.UsageError``; a ``ValueError`` that
    affectjax's or data_prep's own code raised with a ``raise`` statement
    (``ConfigError`` and the other messages naming a flag or file and what
    to do); or a path that does not exist (``FileNotFoundError``,
    ``NotADirectoryError``, ``IsADirectoryError``: a config file, workdir or
    manifest named by a flag). An error ``mark_failure`` marked is never
    one: the trainer marks a file gone or a record damaged once its loop
    has started (not the command's input any more).
  - 1 (``FAILURE``), "read the log": everything else. A ``ReportedFailure``
    (a checkpoint save onto a full disk, say) is printed as its one-line
    message, which says what failed, what is kept and what to do; the
    tracebacks behind it (Orbax's, typically, logged at INFO for a library)
    show with ``--verbosity=0``. Any other exception keeps its traceback: an I/O
    error (``PermissionError``, ``ConnectionError``, ``TimeoutError`` from
    storage) or a bug (a ``ValueError`` from ``int()`` or a reshape, even on
    a line of affectjax's, or from inside a library).

  ``--verbosity`` changes what is printed, never the status: with it, the
  one-line cases print their traceback too.
"""
from __future__ import annotations

import dis
import functools
import logging as std_logging
import os
import sys
import textwrap
import traceback
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from affectjax import xla_cpu

USAGE_ERROR = 2
FAILURE = 1
# Source trees whose INFO lines are a tool's own progress, and whose ``raise``
# statements report a user's mistake.
_OWN_CODE = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 package) + os.sep
    for package in ("affectjax", "data_prep"))
_RAISE = dis.opmap["RAISE_VARARGS"]
# A path named in the command that does not exist, or is of the wrong kind.
MISSING_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
# The attribute ``mark_failure`` sets.
_FAILURE_MARK = "_affectjax_failure"


class ReportedFailure(Exception):
  """A failure (exit 1) whose message is all a user needs: one line.

  Mixed into errors whose message says what failed, what was kept and what
  to do (``checkpoint.CheckpointWriteError``); ``tool`` prints that line,
  and its traceback only when ``--verbosity`` is given.
  """


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


def raised_by_own_code(error: BaseException) -> bool:
  """Whether a ``raise`` statement in affectjax or data_prep created ``error``.

  The innermost frame of its traceback is where it started. A ``raise``
  there is a deliberate report; a call there (``int("x")``, ``x.reshape``)
  means a builtin or a library raised it, which is a bug's signature.
  """
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  code = tb.tb_frame.f_code
  return (_own(code.co_filename) and 0 <= tb.tb_lasti < len(code.co_code)
          and code.co_code[tb.tb_lasti] == _RAISE)


def is_user_error(error: BaseException) -> bool:
  """Whether ``error`` means "fix the command" (exit 2; see the module doc)."""
  if isinstance(error, ReportedFailure) or getattr(error, _FAILURE_MARK, False):
    return False
  if isinstance(error, (app.UsageError, *MISSING_PATH)):
    return True
  return isinstance(error, ValueError) and raised_by_own_code(error)


def mark_failure(error: BaseException) -> None:
  """Makes ``error`` a failure (exit 1, with its traceback) whatever its type.

  For errors that are the command's mistake only at start: a file missing
  or a record damaged once training has started is no longer the command's
  input (``affectjax.main``).
  """
  setattr(error, _FAILURE_MARK, True)


def exit_status(error: BaseException) -> int:
  """``USAGE_ERROR`` or ``FAILURE`` for an exception a tool's main raised."""
  return USAGE_ERROR if is_user_error(error) else FAILURE


def _unknown_field(error: BaseException) -> str | None:
  """What is wrong when ml_collections' ``--config.<path>`` parser failed
  to find a field of the path (its own "Did you mean ..." included); None
  for an error raised anywhere else."""
  frames = traceback.extract_tb(error.__traceback__)
  if not any(f.filename.endswith(os.path.join("config_flags", "config_path.py"))
             for f in frames):
    return None
  text = str(error)
  cause = error
  while cause is not None:  # Its KeyError holds the plain message.
    if isinstance(cause, KeyError) and cause.args and isinstance(
        cause.args[0], str):
      text = cause.args[0]
      break
    cause = cause.__context__
  return ("a --config override names a field the config does not have: "
          + " ".join(line.strip() for line in text.splitlines()))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad or missing flag exiting ``USAGE_ERROR``.

  For ``app.run(..., flags_parser=cli.parse_flags)``: absl's own parser
  exits 1, the status of a failure. An override of a config field that does
  not exist (``--config.batch_sizes=3``) is a bad flag too, although
  ml_collections raises it as an ``AttributeError`` (``_unknown_field``).
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    message = str(e) if isinstance(e, flags.Error) else _unknown_field(e)
    if message is None:
      raise  # A bug (in a config file, say): its traceback, exit 1.
    if "\n" in message:
      message = "\n" + textwrap.indent(message, "  ")
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(USAGE_ERROR)


def tool(main: Callable[[list[str]], int | None], name: str
         ) -> Callable[[list[str]], int | None]:
  """``main`` with quiet library logs and trustworthy exit statuses (for
  ``app.run``; see the module doc)."""

  @functools.wraps(main)
  def wrapped(argv):
    quiet_libraries()
    xla_cpu.configure()  # Before anything compiles.
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      one_line = is_user_error(e) or isinstance(e, ReportedFailure)
      if not one_line:
        raise  # absl prints the traceback; the status is 1.
      sys.stdout.flush()
      if _verbose():
        traceback.print_exc()
      elif isinstance(e, ReportedFailure):
        logging.debug("%s: the traceback of: %s", name, e, exc_info=e)
      print(f"{name}: {e}", file=sys.stderr, flush=True)
      return exit_status(e)

  return wrapped
