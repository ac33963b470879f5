"""The output directory across runs of the converter: which shards a run
finished, whether a rerun's flags match the run it would resume, and the
temporaries a killed run left.

A rerun with the same flags converts only the shards without a completion
marker (`shards.load_done`); the options fingerprint (`.prep_state/
options.json`) refuses to mix runs with different flags in one directory,
unless --overwrite (which removes the previous run's outputs).
"""
from __future__ import annotations

import json
import os
import shutil

from affectjax import data as affect_data
from data_prep import shards


def completed_shards(output_dir: str) -> list[str]:
  """The completion markers of the shards finished in `output_dir`."""
  state_dir = os.path.join(output_dir, shards.STATE_DIR)
  if not os.path.isdir(state_dir):
    return []
  return sorted(n for n in os.listdir(state_dir)
                if n.endswith(".json") and n != "options.json"
                and shards.TMP_TAG not in n)


def check_or_write_options(output_dir: str, fingerprint: dict,
                           overwrite: bool) -> None:
  """Refuses to mix runs with different flags in one output directory.

  A previous run that left no finished shard (e.g. one that stopped on an
  empty split) holds nothing to mix, so new flags simply replace it.
  """
  state_dir = os.path.join(output_dir, shards.STATE_DIR)
  path = os.path.join(state_dir, "options.json")
  if os.path.exists(path):
    with open(path) as fp:
      previous = json.load(fp)
    if (previous != fingerprint and not overwrite and
        completed_shards(output_dir)):
      diff = sorted(k for k in set(previous) | set(fingerprint)
                    if previous.get(k) != fingerprint.get(k))
      raise ValueError(
          f"{output_dir} holds a (possibly partial) run with different "
          f"options ({', '.join(diff)} differ: was "
          f"{ {k: previous.get(k) for k in diff} }, now "
          f"{ {k: fingerprint.get(k) for k in diff} }). Rerun with the same "
          "flags to resume, or pass --overwrite, or use a new --output_dir.")
    if previous != fingerprint:
      wipe(output_dir)
  os.makedirs(state_dir, exist_ok=True)
  shards.write_json_atomic(path, fingerprint)


def wipe(output_dir: str) -> None:
  """--overwrite: removes a previous run's shards, markers and metadata."""
  for name in os.listdir(output_dir):
    p = os.path.join(output_dir, name)
    if (name.startswith(f"{affect_data.DATASET_NAME}-") or
        name in (affect_data.MANIFEST_NAME, "dataset_info.json",
                 "features.json") or name.endswith(".labels.txt")):
      os.remove(p)
  shutil.rmtree(os.path.join(output_dir, shards.STATE_DIR), ignore_errors=True)


def remove_leftover_temps(output_dir: str) -> int:
  """Deletes temp files of a killed run (they are never valid outputs)."""
  n = 0
  for d in (output_dir, os.path.join(output_dir, shards.STATE_DIR)):
    if not os.path.isdir(d):
      continue
    for name in os.listdir(d):
      if shards.TMP_TAG in name:
        p = os.path.join(d, name)
        if os.path.isdir(p):
          shutil.rmtree(p, ignore_errors=True)
        else:
          os.remove(p)
        n += 1
  return n
