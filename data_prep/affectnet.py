r"""AffectNet (any layout) -> sharded ArrayRecord files + manifest.json.

    python -m data_prep.affectnet --input_dir=DIR --output_dir=OUT \
        [--layout=auto|official|npy|folders] [--image_size=112] \
        [--encoding=jpeg|raw] [--jpeg_quality=90] [--margin=0.1] \
        [--classes=8|7] [--num_shards=0 | --examples_per_shard=2048] \
        [--num_workers=N]

Output (OUT):
  affectnet-<split>.array_record-<i>-of-<n>   one tf.train.Example per face
  dataset_info.json, features.json, ...       tensorflow-datasets metadata
  manifest.json                               counts, skips (with examples),
                                              class histogram, options,
                                              tool version, shard checksums
  .prep_state/                                per-shard completion markers

Every bad row or file is skipped and counted by reason, never fatal. A run
killed at any point and rerun with the same flags converts only the shards
that are missing, and the result equals an uninterrupted run record for
record. manifest.json is written last: its presence means the dataset is
complete. See docs/DATA.md for the layouts and docs/BENCHMARKS.md for rates.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import queue
import shutil
import sys
import time
from typing import Any, Sequence

from affectjax import data as affect_data
from data_prep import layouts
from data_prep import shards
from data_prep import tfds_metadata

TOOL_VERSION = "1.0.0"
ENCODINGS = ("jpeg", "raw")


def _num_shards(num_rows: int, num_shards: int,
                examples_per_shard: int) -> int:
  if num_shards > 0:
    return num_shards
  return max(1, math.ceil(num_rows / examples_per_shard))


def _check_or_write_options(output_dir: str, fingerprint: dict,
                            overwrite: bool) -> None:
  """Refuses to mix runs with different flags in one output directory."""
  state_dir = os.path.join(output_dir, shards.STATE_DIR)
  path = os.path.join(state_dir, "options.json")
  if os.path.exists(path):
    import json  # pylint: disable=g-import-not-at-top
    with open(path) as fp:
      previous = json.load(fp)
    if previous != fingerprint and not overwrite:
      diff = sorted(k for k in set(previous) | set(fingerprint)
                    if previous.get(k) != fingerprint.get(k))
      raise ValueError(
          f"{output_dir} holds a (possibly partial) run with different "
          f"options ({', '.join(diff)} differ: was "
          f"{ {k: previous.get(k) for k in diff} }, now "
          f"{ {k: fingerprint.get(k) for k in diff} }). Rerun with the same "
          "flags to resume, or pass --overwrite, or use a new --output_dir.")
    if previous != fingerprint:
      _wipe(output_dir)
  os.makedirs(state_dir, exist_ok=True)
  shards.write_json_atomic(path, fingerprint)


def _wipe(output_dir: str) -> None:
  """--overwrite: removes a previous run's shards, markers and metadata."""
  for name in os.listdir(output_dir):
    p = os.path.join(output_dir, name)
    if (name.startswith(f"{affect_data.DATASET_NAME}-") or
        name in (affect_data.MANIFEST_NAME, "dataset_info.json",
                 "features.json") or name.endswith(".labels.txt")):
      os.remove(p)
  shutil.rmtree(os.path.join(output_dir, shards.STATE_DIR), ignore_errors=True)


def _remove_leftover_temps(output_dir: str) -> int:
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


_progress_queue = None


def _init_worker(q) -> None:
  global _progress_queue
  _progress_queue = q


def _run_in_worker(task: shards.ShardTask) -> dict:
  return shards.run(task, progress=_progress_queue.put)


def _run_tasks(tasks: Sequence[shards.ShardTask], total_rows: int,
               num_workers: int, progress: bool) -> None:
  """Runs shard tasks, in-process or over a spawn pool, with a tqdm bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=total_rows, unit="img", disable=not progress,
             desc="data_prep", smoothing=0.05, file=sys.stderr)
  try:
    if num_workers <= 1 or len(tasks) <= 1:
      for t in tasks:
        shards.run(t, progress=bar.update)
      return
    # spawn, not fork: callers (tests, notebooks) may have jax/threads loaded.
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with ctx.Pool(min(num_workers, len(tasks)), initializer=_init_worker,
                  initargs=(q,), maxtasksperchild=None) as pool:
      pending = [pool.apply_async(_run_in_worker, (t,)) for t in tasks]
      while pending:
        try:
          while True:
            bar.update(q.get(timeout=0.2))
        except queue.Empty:
          pass
        still = []
        for r in pending:
          if r.ready():
            r.get()  # Re-raises a worker's exception here.
          else:
            still.append(r)
        pending = still
      while True:  # Drain the last progress messages.
        try:
          bar.update(q.get_nowait())
        except queue.Empty:
          break
  finally:
    bar.close()


def prepare(input_dir: str, output_dir: str, *, layout: str = "auto",
            image_size: int = 112, encoding: str = "jpeg",
            jpeg_quality: int = 90, margin: float = 0.1, classes: int = 8,
            num_shards: int = 0, examples_per_shard: int = 2048,
            num_workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
  """Converts an AffectNet tree; returns the manifest dict (see module doc).

  Args:
    input_dir: the AffectNet root (any supported layout).
    output_dir: destination; created if needed.
    layout: 'auto' (detect), 'official', 'npy' or 'folders'.
    image_size: output side in px (square face crops).
    encoding: 'jpeg' or 'raw' (uint8 pixels).
    jpeg_quality: 1-100, for encoding='jpeg'.
    margin: official layout: extra context around the face box, as a
      fraction of the box side on each side (clipped to the image).
    classes: 8, or 7 for the protocol without Contempt.
    num_shards: shards per split; 0 = size them by `examples_per_shard`.
    examples_per_shard: target rows per shard when num_shards is 0.
    num_workers: parallel processes (<= 1: in this process).
    overwrite: replace a previous run with different options.
    progress: show a tqdm bar (rate and ETA).
  """
  input_dir = os.path.abspath(input_dir)
  output_dir = os.path.abspath(output_dir)
  if encoding not in ENCODINGS:
    raise ValueError(f"--encoding must be one of {ENCODINGS}, got "
                     f"{encoding!r}.")
  if classes not in (7, 8):
    raise ValueError(f"--classes must be 8 or 7, got {classes}.")
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f"--jpeg_quality must be in 1..100, got {jpeg_quality}.")
  if image_size < 8:
    raise ValueError(f"--image_size must be >= 8, got {image_size}.")
  if margin < 0:
    raise ValueError(f"--margin must be >= 0, got {margin}.")
  if num_shards < 0 or examples_per_shard < 1:
    raise ValueError("--num_shards must be >= 0 and --examples_per_shard "
                     ">= 1.")
  resolved = layouts.detect(input_dir) if layout == "auto" else layout
  indexes = {}
  for split in affect_data.SPLITS:
    idx = layouts.index_split(resolved, input_dir, split)
    if idx is not None:
      indexes[split] = idx
  if "train" not in indexes and "val" not in indexes:
    raise layouts.LayoutError(f"{input_dir} has no train or val split in the "
                              f"{resolved!r} layout.")
  missing_splits = [s for s in affect_data.SPLITS if s not in indexes]
  for s in missing_splits:
    print(f"note: {input_dir} has no {s!r} split ({resolved} layout); it is "
          "left out of the output.", file=sys.stderr)
  shard_counts = {s: _num_shards(len(idx), num_shards, examples_per_shard)
                  for s, idx in indexes.items()}
  opts = shards.ConvertOptions(image_size=image_size, encoding=encoding,
                               jpeg_quality=jpeg_quality, margin=margin,
                               num_classes=classes)
  # Everything that changes the bytes written. num_workers is not in it: the
  # output does not depend on it.
  fingerprint = {
      "tool_version": TOOL_VERSION, "input_dir": input_dir,
      "layout": resolved, **dataclasses.asdict(opts),
      "num_shards": shard_counts,
      "rows": {s: len(idx) for s, idx in indexes.items()},
  }
  os.makedirs(output_dir, exist_ok=True)
  _check_or_write_options(output_dir, fingerprint, overwrite)
  _remove_leftover_temps(output_dir)

  tasks, todo_rows = [], 0
  for split, idx in indexes.items():
    n, k = len(idx), shard_counts[split]
    for i in range(k):
      # Shard i = the contiguous block of rows [i*n//k, (i+1)*n//k).
      task = shards.ShardTask(output_dir, split, i, k,
                              idx.part(i * n // k, (i + 1) * n // k), opts)
      if shards.load_done(output_dir, task.filename) is None:
        tasks.append(task)
        todo_rows += (i + 1) * n // k - i * n // k
  total = sum(shard_counts.values())
  if tasks and len(tasks) < total:
    print(f"resuming: {total - len(tasks)} of {total} shards already done.",
          file=sys.stderr)
  elif not tasks and progress:
    print(f"all {total} shards are already complete; rewriting the "
          "metadata only.", file=sys.stderr)
  start = time.time()
  if tasks:
    _run_tasks(tasks, todo_rows, num_workers, progress)
  elapsed = time.time() - start

  manifest = _manifest(output_dir, input_dir, resolved, opts, indexes, shard_counts,
                       num_shards, examples_per_shard, missing_splits)
  tfds_metadata.write(
      output_dir, image_size=image_size, encoding=encoding,
      num_classes=classes,
      splits={s: [(sh["num_examples"], sh["num_bytes"])
                  for sh in info["shards"]]
              for s, info in manifest["splits"].items()},
      description=f"AffectNet face crops prepared by data_prep.affectnet "
                  f"{TOOL_VERSION} from the {resolved!r} layout.")
  shards.write_json_atomic(
      os.path.join(output_dir, affect_data.MANIFEST_NAME), manifest)
  if progress:
    written = sum(s["written"] for s in manifest["splits"].values())
    skipped = sum(sum(s["skipped"].values())
                  for s in manifest["splits"].values())
    print(f"{output_dir}: {written} examples written, {skipped} skipped "
          f"(this run: {todo_rows} rows in {elapsed:.1f}s)", file=sys.stderr)
  return manifest


def _manifest(output_dir, input_dir, layout, opts, indexes, shard_counts,
              num_shards, examples_per_shard, missing_splits
              ) -> dict[str, Any]:
  """Aggregates the per-shard stats into manifest.json's content."""
  splits = {}
  for split in indexes:
    k = shard_counts[split]
    stats = []
    for i in range(k):
      name = affect_data.shard_filename(split, i, k)
      s = shards.load_done(output_dir, name)
      if s is None:
        raise RuntimeError(f"shard {name} did not complete; rerun the same "
                           "command to finish it.")
      stats.append(s)
    splits[split] = _aggregate(stats, opts.num_classes, len(indexes[split]))
  names = affect_data.label_names(opts.num_classes)
  return {
      "tool": "data_prep.affectnet",
      "tool_version": TOOL_VERSION,
      "input_dir": input_dir,
      "layout": layout,
      "options": {**dataclasses.asdict(opts), "layout": layout,
                  "num_shards": num_shards,
                  "examples_per_shard": examples_per_shard},
      "num_classes": opts.num_classes,
      "label_names": list(names),
      # Source expression code -> class id (identity on the kept codes).
      "label_mapping": {str(c): c for c in range(opts.num_classes)},
      # folders layout: each class folder's name -> expression code.
      "class_folders": {s: getattr(idx, "class_folders", None)
                        for s, idx in indexes.items()
                        if getattr(idx, "class_folders", None) is not None},
      "image_size": opts.image_size,
      "encoding": opts.encoding,
      "jpeg_quality": opts.jpeg_quality if opts.encoding == "jpeg" else None,
      "no_value": affect_data.NO_VALUE,
      "record_format": ("tf.train.Example (tfds FeaturesDict: image, "
                        "expression, valence, arousal, landmarks, path) in "
                        "ArrayRecord, options "
                        f"{shards.WRITER_OPTIONS[opts.encoding]!r}"),
      "landmarks": "68 (x, y) points in output-image pixels; NaN if unknown",
      "missing_splits": missing_splits,
      "splits": splits,
  }


def _aggregate(stats: list, num_classes: int,
               num_rows: int) -> dict[str, Any]:
  skipped: dict[str, int] = {}
  examples: dict[str, list] = {}
  class_counts = [0] * num_classes
  for s in stats:
    for reason, n in s["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + n
    for reason, ex in s["skip_examples"].items():
      room = shards.MAX_SKIP_EXAMPLES - len(examples.setdefault(reason, []))
      examples[reason].extend(ex[:room])
    class_counts = [a + b for a, b in zip(class_counts, s["class_counts"])]
  written = sum(s["num_examples"] for s in stats)
  return {
      "rows": num_rows,
      "written": written,
      "skipped": dict(sorted(skipped.items())),
      "skip_examples": dict(sorted(examples.items())),
      "class_counts": class_counts,
      "num_shards": len(stats),
      "shards": [{"file": s["file"], "num_examples": s["num_examples"],
                  "num_bytes": s["num_bytes"], "sha256": s["sha256"]}
                 for s in stats],
  }


def main(argv: Sequence[str] | None = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(
      prog="python -m data_prep.affectnet",
      description="Convert AffectNet (official, npy or folders layout) to "
                  "sharded ArrayRecord files + manifest.json. See "
                  "docs/DATA.md.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--input_dir", required=True,
                  help="AffectNet root, in any supported layout.")
  ap.add_argument("--output_dir", required=True)
  ap.add_argument("--layout", default="auto",
                  choices=("auto",) + layouts.LAYOUTS)
  ap.add_argument("--image_size", type=int, default=112,
                  help="Output side of the square face crops, px.")
  ap.add_argument("--encoding", default="jpeg", choices=ENCODINGS)
  ap.add_argument("--jpeg_quality", type=int, default=90)
  ap.add_argument("--margin", type=float, default=0.1,
                  help="Context around the face box (official layout), as a "
                       "fraction of the box side on each side.")
  ap.add_argument("--classes", type=int, default=8, choices=(8, 7),
                  help="8, or 7 = the protocol without Contempt.")
  ap.add_argument("--num_shards", type=int, default=0,
                  help="Shards per split; 0 = use --examples_per_shard.")
  ap.add_argument("--examples_per_shard", type=int, default=2048,
                  help="Target rows per shard when --num_shards=0.")
  ap.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--overwrite", action="store_true",
                  help="Replace a previous run made with different flags.")
  ap.add_argument("--no_progress", action="store_true")
  a = ap.parse_args(argv)
  try:
    prepare(a.input_dir, a.output_dir, layout=a.layout,
            image_size=a.image_size, encoding=a.encoding,
            jpeg_quality=a.jpeg_quality, margin=a.margin, classes=a.classes,
            num_shards=a.num_shards, examples_per_shard=a.examples_per_shard,
            num_workers=a.num_workers, overwrite=a.overwrite,
            progress=not a.no_progress)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
