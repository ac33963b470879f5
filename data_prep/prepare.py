r"""The data_prep driver: any dataset it reads -> ArrayRecord + manifest.

AffectNet (any layout) or a public expression set (FER2013, FERPlus, RAF-DB,
class-folder trees). `python -m data_prep.affectnet` (the documented entry
point) and `python -m data_prep.prepare` are the same program.

    python -m data_prep.affectnet --input_dir=DIR --output_dir=OUT \
        [--layout=auto|official|npy|folders|fer2013|ferplus|ferplus_folders|
                 rafdb] \
        [--image_size=320] [--encoding=jpeg|raw] [--jpeg_quality=90] \
        [--margin=0.1] [--classes=8|7 (default: the dataset's)] \
        [--folder_numbers=auto|affectnet|fer2013|rafdb] \
        [--num_shards=0 | --examples_per_shard=2048] \
        [--holdout_fraction=0.05 --holdout_seed=0] [--follow_symlinks] \
        [--num_workers=N] [--overwrite] [--[no]progress]

`--help` lists these flags, `--helpfull` every flag (absl).

Output (OUT):
  affectnet-<split>.array_record-<i>-of-<n>   one tf.train.Example per face
  dataset_info.json, features.json, ...       tensorflow-datasets metadata
  manifest.json                               counts, skips (with examples),
                                              class histogram, options,
                                              tool version, shard checksums
  .prep_state/                                per-shard completion markers

The public sets (FER2013's fer2013.csv, FERPlus's fer2013new.csv or its
FER2013Train/Valid/Test folders with label.csv, RAF-DB basic, and
class-folder trees with train/ + test/) are read as published; see
data_prep/public_sets.py and data_prep/rafdb.py (data_prep/registry.py lists
every layout). Their labels are mapped to AffectNet's class ids by name;
FER2013 and RAF-DB have 7 classes (no Contempt), FERPlus 8.

Every bad row or file is skipped and counted by reason, never fatal for the
run; but a split that ends with zero examples is (exit status 3, naming the
most common skip reason and what to do). A run killed at any point and rerun
with the same flags converts only the shards that are missing, and the
result equals an uninterrupted run record for record. manifest.json is
written last: its presence means the dataset is complete.

Why 320 px by default: one prepared copy then serves every shipped config
(custom CNN 112 px, VGG16 224, EfficientNet-B3 300) with room for the
random-crop augmentation; the trainer crops and resizes on the device and
refuses a prepared size smaller than its `config.image_size`.

Exit status: 0 done; 1 bad flags or input (the message names the flag, file
or row); 3 a split has zero examples. See docs/DATA.md for the layouts and
docs/BENCHMARKS.md for rates.

This module validates the options, indexes the splits and runs the shard
tasks; manifest.json's content, the summary line and the empty-split failure
are `data_prep.manifest`'s, the bookkeeping that lets a rerun resume is
`data_prep.output_state`'s.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import queue
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from affectjax import data as affect_data
from data_prep import manifest as manifest_lib
from data_prep import output_state
from data_prep import registry
from data_prep import rows
from data_prep import shards
from data_prep import tfds_metadata
# Part of this module's interface (and data_prep.affectnet's).
from data_prep.manifest import EmptySplitError

__all__ = ["DEFAULT_IMAGE_SIZE", "ENCODINGS", "EXIT_EMPTY_SPLIT",
           "EmptySplitError", "TOOL_VERSION", "define_flags", "main",
           "prepare", "run_app"]

TOOL_VERSION = "1.1.0"
ENCODINGS = ("jpeg", "raw")
# Large enough for every shipped config (custom CNN 112, VGG16 224,
# EfficientNet-B3 300) plus the trainer's random crop; see the module doc.
DEFAULT_IMAGE_SIZE = 320
EXIT_EMPTY_SPLIT = 3


def _num_shards(num_rows: int, num_shards: int,
                examples_per_shard: int) -> int:
  if num_shards > 0:
    return num_shards
  return max(1, math.ceil(num_rows / examples_per_shard))


_progress_queue = None


def _init_worker(q) -> None:
  global _progress_queue
  _progress_queue = q


def _run_in_worker(task: shards.ShardTask) -> dict:
  return shards.run(task, progress=_progress_queue.put)


def _run_tasks(tasks: Sequence[shards.ShardTask], total_rows: int,
               num_workers: int, progress: bool | None) -> None:
  """Runs shard tasks, in-process or over a spawn pool, with a tqdm bar
  (``progress`` None: only when stderr is a terminal, so logs stay clean)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=total_rows, unit="img",
             disable=None if progress is None else not progress,
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
            image_size: int = DEFAULT_IMAGE_SIZE, encoding: str = "jpeg",
            jpeg_quality: int = 90, margin: float = 0.1,
            classes: int | None = None, folder_numbers: str = "auto",
            num_shards: int = 0, examples_per_shard: int = 2048,
            holdout_fraction: float = 0.0, holdout_seed: int = 0,
            follow_symlinks: bool = False, num_workers: int = 1,
            overwrite: bool = False,
            progress: bool | None = None) -> dict[str, Any]:
  """Converts an AffectNet tree; returns the manifest dict (see module doc).

  Args:
    input_dir: the AffectNet root (any supported layout).
    output_dir: destination; created if needed.
    layout: 'auto' (detect), 'official', 'npy' or 'folders'.
    image_size: output side in px (square face crops). Smaller sources are
      upscaled, and counted (`splits.<split>.upscaled` in the manifest).
    encoding: 'jpeg' or 'raw' (uint8 pixels).
    jpeg_quality: 1-100, for encoding='jpeg'.
    margin: official layout: extra context around the face box, as a
      fraction of the box side on each side (clipped to the image).
    classes: 8, or 7 for the protocol without Contempt; None = the
      dataset's own (`registry.natural_classes`: 7 for FER2013, RAF-DB and
      class trees without a Contempt folder, else 8).
    folder_numbers: folders layout: whose label order numeric class folders
      follow: 'affectnet' (0-7), 'fer2013' (0 angry ... 6 neutral) or
      'rafdb' (1 surprise ... 7 neutral); 'auto' = affectnet, but folders
      numbered 1-7 without 0 (RAF-DB's numbering) are refused.
    num_shards: shards per split; 0 = size them by `examples_per_shard`.
    examples_per_shard: target rows per shard when num_shards is 0.
    holdout_fraction: in [0, 1): the class-stratified fraction of the train
      rows written as a separate `holdout` split (for model selection), never
      in train; 0 = no holdout. See `registry.split_holdout`.
    holdout_seed: which rows the holdout draws (fixed for a given seed).
    follow_symlinks: read symlinks in the input tree that point outside it
      (without it they are skipped as `symlink_outside_root`). Rows whose own
      path leaves the root are refused either way.
    num_workers: parallel processes (<= 1: in this process).
    overwrite: replace a previous run with different options.
    progress: a tqdm bar (rate and ETA): True/False to force, None (default)
      only when stderr is a terminal.

  Raises:
    ValueError: a bad option or input layout (the message names it).
    EmptySplitError: a split has zero examples (no rows, or all skipped);
      manifest.json is not written.
  """
  input_dir = os.path.abspath(input_dir)
  output_dir = os.path.abspath(output_dir)
  if encoding not in ENCODINGS:
    raise ValueError(f"--encoding must be one of {ENCODINGS}, got "
                     f"{encoding!r}.")
  if classes is not None and classes not in (7, 8):
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
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f"--holdout_fraction must be in [0, 1), got "
                     f"{holdout_fraction}.")
  resolved = registry.detect(input_dir) if layout == "auto" else layout
  registry.get(resolved)  # A clear error for an unknown name.
  indexes = {}
  source_splits = registry.source_splits(resolved, input_dir)
  for split in source_splits:
    idx = registry.index_split(resolved, input_dir, split,
                              follow_symlinks=follow_symlinks,
                              folder_numbers=folder_numbers)
    if idx is not None:
      indexes[split] = idx
  if "train" not in indexes and "val" not in indexes:
    raise rows.LayoutError(f"{input_dir} has no train or val split in the "
                              f"{resolved!r} layout.")
  registry.check(resolved, indexes, folder_numbers=folder_numbers)
  missing_splits = [s for s in source_splits if s not in indexes]
  for s in missing_splits:
    print(f"note: {input_dir} has no {s!r} split ({resolved} layout); it is "
          "left out of the output.", file=sys.stderr)
  if getattr(indexes.get("val"), "source", None) == "test/":
    print(f"note: {input_dir} has no val/ folder: test/ is the evaluation "
          "split ('val').", file=sys.stderr)
  if getattr(indexes.get("val"), "usage_prefix", None):
    print(f"note: {input_dir} has no val/ folder and test/'s file names "
          "carry FER2013's Usage: PublicTest_* is the holdout (model "
          "selection) and PrivateTest_* the evaluation split ('val'), as "
          "from fer2013.csv.", file=sys.stderr)
  if classes is None:
    classes = registry.natural_classes(resolved, indexes)
    if classes == 7 and resolved == "folders":
      print(f"note: no Contempt class folder in {input_dir}: 7 classes "
            "(pass --classes=8 to keep 8).", file=sys.stderr)
  for split, idx in indexes.items():
    if not len(idx):
      raise EmptySplitError(
          f"split {split!r} has no rows: {idx.inputs()[0]} is empty. Add its "
          "rows or images, or remove it, then rerun.")
  if holdout_fraction > 0:
    # A layout's own holdout (FER2013's PublicTest) when the input has it;
    # without it (e.g. FER+'s FER2013Valid/ used as the training faces of a
    # fine-tune) one is carved from train like any other layout's.
    if rows.HOLDOUT in indexes:
      raise ValueError(
          f"--holdout_fraction={holdout_fraction}: {input_dir} has its own "
          "holdout split (FER2013's PublicTest, the standard model-selection "
          "set); drop the flag.")
    if "train" not in indexes:
      raise ValueError(f"--holdout_fraction={holdout_fraction} needs a train "
                       f"split, and {input_dir} has none.")
    n_train = len(indexes["train"])
    indexes["train"], indexes[rows.HOLDOUT] = registry.split_holdout(
        indexes["train"], holdout_fraction, holdout_seed)
    if not len(indexes[rows.HOLDOUT]):
      raise ValueError(
          f"--holdout_fraction={holdout_fraction} selects no row of the "
          f"{n_train} train rows (per class, round(fraction * rows) is 0, or "
          "no row has a readable expression code); raise it.")
  unused = registry.unused_inputs(input_dir, indexes, ignore=[output_dir])
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
      "follow_symlinks": follow_symlinks,
      "holdout_fraction": holdout_fraction, "holdout_seed": holdout_seed,
      "num_shards": shard_counts,
      "rows": {s: len(idx) for s, idx in indexes.items()},
  }
  if resolved == "folders" and folder_numbers in ("fer2013", "rafdb"):
    fingerprint["folder_numbers"] = folder_numbers  # Other class codes.
  os.makedirs(output_dir, exist_ok=True)
  output_state.check_or_write_options(output_dir, fingerprint,
                                     overwrite)
  output_state.remove_leftover_temps(output_dir)

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
  elif not tasks and progress is not False:
    print(f"all {total} shards are already complete; rewriting the "
          "metadata only.", file=sys.stderr)
  start = time.time()
  if tasks:
    _run_tasks(tasks, todo_rows, num_workers, progress)
  elapsed = time.time() - start

  manifest = manifest_lib.build(
      output_dir, input_dir, resolved, opts, indexes, shard_counts,
      num_shards, examples_per_shard, missing_splits, unused,
      follow_symlinks, holdout_fraction, holdout_seed, folder_numbers,
      tool_version=TOOL_VERSION)
  manifest_lib.fail_on_empty_splits(output_dir, manifest, indexes)
  tfds_metadata.write(
      output_dir, image_size=image_size, encoding=encoding,
      num_classes=classes,
      splits={s: [(sh["num_examples"], sh["num_bytes"])
                  for sh in info["shards"]]
              for s, info in manifest["splits"].items()},
      description=f"{manifest['dataset']} face crops prepared by "
                  f"data_prep.affectnet {TOOL_VERSION} from the {resolved!r} "
                  "layout.")
  shards.write_json_atomic(
      os.path.join(output_dir, affect_data.MANIFEST_NAME), manifest)
  print(manifest_lib.summary(output_dir, manifest, todo_rows, elapsed),
        file=sys.stderr)
  return manifest


def define_flags() -> None:
  """Defines the command-line flags (absl), as the trainer does.

  Called only when the module runs as a program: `data_prep.synthetic`
  shares flag names (`--output_dir`, `--image_size`, ...), and both modules
  are imported together by tests and notebooks.
  """
  flags.DEFINE_string("input_dir", None,
                      "AffectNet root in any supported layout, or a public "
                      "set (FER2013, FERPlus, RAF-DB) as published.")
  flags.DEFINE_string("output_dir", None, "Destination directory.")
  flags.DEFINE_enum("layout", "auto", ("auto",) + registry.NAMES,
                    "Input layout; 'auto' detects it.")
  flags.DEFINE_integer(
      "image_size", DEFAULT_IMAGE_SIZE,
      "Output side of the square face crops, px. The default fits every "
      "shipped config (112, 224, 300) plus the trainer's random crop.",
      lower_bound=8)
  flags.DEFINE_enum("encoding", "jpeg", ENCODINGS,
                    "Stored image bytes: JPEG or raw uint8 pixels.")
  flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality, 1-100.",
                       lower_bound=1, upper_bound=100)
  flags.DEFINE_float("margin", 0.1,
                     "Context around the face box (official layout), as a "
                     "fraction of the box side on each side.", lower_bound=0)
  flags.DEFINE_integer(
      "classes", None, "8, or 7 = the protocol without Contempt. Default: "
      "the dataset's own (8 for AffectNet and FERPlus; 7 for FER2013, RAF-DB "
      "and class trees without a Contempt folder).", lower_bound=7,
      upper_bound=8)
  flags.DEFINE_enum(
      "folder_numbers", "auto", registry.FOLDER_NUMBERS,
      "folders layout: whose label order numeric class folders follow: "
      "affectnet (0 neutral ... 7 contempt), fer2013 (0 angry ... 6 neutral), "
      "rafdb (1 surprise ... 7 neutral). auto = affectnet, but folders 1-7 "
      "without 0 (RAF-DB's) are refused.")
  flags.DEFINE_integer("num_shards", 0,
                       "Shards per split; 0 = use --examples_per_shard.",
                       lower_bound=0)
  flags.DEFINE_integer("examples_per_shard", 2048,
                       "Target rows per shard when --num_shards=0.",
                       lower_bound=1)
  flags.DEFINE_float(
      "holdout_fraction", 0.0,
      "Class-stratified fraction of the train rows written as a separate "
      "'holdout' split for model selection (never in train); 0 = none.")
  flags.DEFINE_integer("holdout_seed", 0,
                       "Seed that picks the holdout rows (stable per seed).")
  flags.DEFINE_bool(
      "follow_symlinks", False,
      "Read symlinks in the input tree that point outside it (a dataset "
      "assembled from links). Rows whose own path leaves the root are "
      "refused either way.")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                       "Parallel conversion processes.")
  flags.DEFINE_bool("overwrite", False,
                    "Replace a previous run made with different flags.")
  flags.DEFINE_bool("progress", None, "Show a progress bar (rate, ETA). "
                    "Default: only when stderr is a terminal (a log file "
                    "gets none); --noprogress hides it (--no_progress "
                    "too).")
  flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    prepare(f.input_dir, f.output_dir, layout=f.layout,
            image_size=f.image_size, encoding=f.encoding,
            jpeg_quality=f.jpeg_quality, margin=f.margin, classes=f.classes,
            folder_numbers=f.folder_numbers,
            num_shards=f.num_shards, examples_per_shard=f.examples_per_shard,
            holdout_fraction=f.holdout_fraction,
            holdout_seed=f.holdout_seed, follow_symlinks=f.follow_symlinks,
            num_workers=f.num_workers, overwrite=f.overwrite,
            progress=f.progress)
  except EmptySplitError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_EMPTY_SPLIT)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


# The flag's former spelling (a negative boolean, listed as --[no]no_progress).
_RENAMED = {"--no_progress": "--noprogress"}


def run_app() -> None:
  """Parses the command line (flags defined) and runs `main`."""
  app.run(main, argv=[_RENAMED.get(a, a) for a in sys.argv])


if __name__ == "__main__":
  define_flags()
  run_app()
