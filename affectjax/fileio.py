"""How a run writes its files: whole or not at all, and strict JSON.

Every file affectjax writes into a workdir (``config.json``, ``best.json``,
``metrics.jsonl`` when it is rewritten, ``report.html`` and its PNGs, the
evaluate/export/predict outputs) goes through ``write_bytes``: the bytes go to
a temporary name in the destination's directory, which is then renamed over
the destination. A reader (a person refreshing the report, a resumed run, a
second host) sees the old file or the new one, never half of one. Paths are
``etils.epath`` paths: local or ``gs://...``.

JSON files hold strict JSON: ``to_json_compatible`` turns numpy/jax values
into Python ones and NaN/inf into ``null`` (``json.dumps`` would otherwise
write the non-standard token ``NaN``, which other tools refuse).
"""
from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any

import numpy as np
from etils import epath


def write_bytes(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` under a temporary name, then renames it.

  The temporary name is unique per call (process id and a random part), so
  concurrent writers of the same file never write into each other's
  temporary file; the last rename wins. Parent directories are created.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_text(path, text: str) -> None:
  """``write_bytes`` of ``text`` encoded as UTF-8."""
  write_bytes(path, text.encode("utf-8"))


def to_json_compatible(value: Any) -> Any:
  """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts.

  Dicts, lists and tuples are copied recursively (tuples become lists);
  numpy and jax arrays and scalars become Python numbers or lists; non-finite
  floats (NaN, inf: an undefined metric) become None.
  """
  if isinstance(value, dict):
    return {k: to_json_compatible(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_compatible(v) for v in value]
  if isinstance(value, (bool, int, str)) or value is None:
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if hasattr(value, "__array__"):  # numpy/jax arrays and numpy scalars.
    return to_json_compatible(np.asarray(value).tolist())
  return value


def dumps(value: Any, **kwargs) -> str:
  """Strict JSON text of ``value`` (``to_json_compatible`` first)."""
  return json.dumps(to_json_compatible(value), allow_nan=False, **kwargs)


def write_json(path, value: Any, *, indent: int | None = 2) -> None:
  """``value`` as strict JSON (plus a final newline), written atomically."""
  write_text(path, dumps(value, indent=indent) + "\n")
