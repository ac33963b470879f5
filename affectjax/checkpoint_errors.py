"""What a checkpoint error means: the exceptions of affectjax.checkpoint, and
how a storage's errors are read.

Orbax stores arrays through tensorstore, which raises every failure as a
``ValueError`` whose message starts with an absl status code. Whether a
failed read means that a step's bytes are bad (set the step aside) or that
the storage failed (stop, keep every step), and whether a failed save met a
storage that refused or one that did not answer, is decided here from the
error alone; ``affectjax.checkpoint`` acts on it (and re-exports the
exceptions and ``bytes_are_bad``, where callers import them from).
"""
from __future__ import annotations

import json
import re

from affectjax import cli

class IncompatibleCheckpointError(ValueError):
  """A checkpoint this run cannot continue, whatever its topology (e.g. it
  was saved with another global batch size)."""


class CheckpointWriteError(cli.ReportedFailure, OSError):
  """A save that failed on storage (full disk, read-only or vanished
  directory, a storage timeout); its message says what is kept and what to do.
  """


class UnreadableCheckpointError(ValueError):
  """A step whose files are incomplete (an item or the data position missing)."""


class CheckpointReadError(RuntimeError):
  """A step that could not be read for a reason other than bad bytes (a
  storage timeout, an out-of-memory device, a changed model): the run stops
  and the step stays where it is."""


# tensorstore (Orbax's array storage) raises every failure as a ValueError
# whose message starts with the absl status code ("DATA_LOSS: ..."), except
# INVALID_ARGUMENT, which has no prefix. These codes, on reading a committed
# step, mean its bytes are bad: a checksum or decoder rejected them, a file
# is shorter than its index says, or a file the index names is gone.
_BAD_BYTES_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_STATUS_CODE = re.compile(r"^([A-Z][A-Z_]+): ")


# The file a tensorstore NOT_FOUND names: the last local file or bucket
# object in its message. When that is the OCDBT database (a directory,
# "/" at the end), an entry of it is missing: no file to look for.
_NOT_FOUND_PATH = re.compile(r'(?:local file "([^"]+)"|"((?:gs|s3)://[^"]+)")')


def not_found_path(error: BaseException) -> str | None:
  """The path of the file a tensorstore NOT_FOUND error names, or None."""
  message = str(error).split(" [tensorstore_spec", 1)[0]
  code = _STATUS_CODE.match(message)
  if not code or code.group(1) != "NOT_FOUND":
    return None
  found = _NOT_FOUND_PATH.findall(message)
  path = next((p for p in found[-1] if p), None) if found else None
  return None if path is None or path.endswith("/") else path


def bytes_are_bad(error: BaseException) -> bool:
  """Whether reading a committed step failed because its files are corrupt.

  True for: tensorstore's DATA_LOSS, OUT_OF_RANGE (truncated) and NOT_FOUND
  (a data file gone; ``restore_latest`` then checks that the step itself
  is there, ``Checkpointer._absent``); its unprefixed INVALID_ARGUMENT when
  a decoder rejected stored bytes ("Error decoding ...": a failed
  decompression); a metadata file that is not JSON, or not even text
  (``UnicodeDecodeError``: Orbax reads its JSON metadata files with
  ``read_text``, and which file of a damaged step fails first is a race); an
  item directory or the data position missing (``UnreadableCheckpointError``, Orbax's "was not found in the
  checkpoint"). False for everything else, so a storage timeout
  (UNAVAILABLE, DEADLINE_EXCEEDED, ``TimeoutError``), a permission glitch,
  a device out of memory or a changed model shape never sets a step aside.
  """
  if isinstance(error, (UnreadableCheckpointError, json.JSONDecodeError,
                        UnicodeDecodeError)):
    return True
  message = str(error)
  if isinstance(error, KeyError):
    return "was not found in the checkpoint" in message
  if type(error) is not ValueError:  # pylint: disable=unidiomatic-typecheck
    return False
  code = _STATUS_CODE.match(message)
  if code:
    return code.group(1) in _BAD_BYTES_CODES
  return "Error decoding" in message


# Failures of the storage rather than of the code: tensorstore's status codes
# that a write or read of a reachable, healthy store does not produce.
_UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")


def storage_failure(error: BaseException) -> bool:
  """An ``OSError`` (full or read-only disk, ``ConnectionError``,
  ``TimeoutError``) or a tensorstore error with a status code; not a bug."""
  return isinstance(error, OSError) or (
      type(error) is ValueError  # pylint: disable=unidiomatic-typecheck
      and _STATUS_CODE.match(str(error)) is not None)


def unreachable(error: BaseException) -> bool:
  """A storage that did not answer (as opposed to one that refused)."""
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  code = _STATUS_CODE.match(str(error))
  return bool(code) and code.group(1) in _UNREACHABLE_CODES


def first_line(error: BaseException) -> str:
  """The message without tensorstore's spec dump (hundreds of characters)."""
  text = str(error).split(" [tensorstore_spec", 1)[0].strip()
  return text.splitlines()[0].rstrip(".") if text else repr(error)


def root_cause(error: BaseException) -> BaseException:
  """The error at the end of the ``raise ... from`` chain: what Orbax's
  wrappers (a future that "timed out" because the write failed) stand for."""
  seen = {id(error)}
  while error.__cause__ is not None and id(error.__cause__) not in seen:
    error = error.__cause__
    seen.add(id(error))
  return error
