"""What a finished conversion says about itself: manifest.json's content
(aggregated from the per-shard completion markers), the one summary line a
run ends with, and the failure of a split that ended with zero examples
(with what to do about its most common skip reason).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from affectjax import data as affect_data
from data_prep import labels
from data_prep import output_state
from data_prep import registry
from data_prep import rows
from data_prep import shards


class EmptySplitError(RuntimeError):
  """A split ended with zero examples; the message says why and what to do."""


# What to do when (most of) a split's rows are skipped for a reason.
ADVICE = {
    labels.SYMLINK_OUTSIDE_ROOT:
        "the images are symlinks that point outside the input tree; if you "
        "placed them there, rerun with --follow_symlinks",
    labels.PATH_ESCAPES_ROOT:
        "the rows name absolute paths or paths with '..' that leave the image "
        "folder; they are never read: make them relative to the image folder",
    labels.MISSING_FILE:
        "the images the rows name do not exist: check that --input_dir is the "
        "folder that holds them (and --layout)",
    labels.EXCLUDED_CLASS:
        "every row is a class the --classes protocol leaves out; use "
        "--classes=8",
    labels.MISSING_ANNOTATION:
        "the images have no annotations/<N>_exp.npy, _val.npy, _aro.npy; "
        "check the npy tree",
    labels.NOT_AN_IMAGE:
        "no file has an image extension "
        f"({', '.join(rows.IMAGE_EXTENSIONS)})",
    labels.UNKNOWN_SPLIT:
        "the rows' Usage (FER2013/FERPlus) or image name (RAF-DB: train_*, "
        "test_*) names no split; check that the file is the published one",
    labels.DROPPED_BY_FERPLUS:
        "every row has an empty 'Image name' (faces FERPlus removed); check "
        "that fer2013new.csv is the published file",
}


def summary(output_dir: str, manifest: dict, todo_rows: int,
            elapsed: float) -> str:
  """The one line a run ends with: what was written, skipped, upscaled and
  left unused (details in manifest.json)."""
  splits = manifest["splits"]
  written = ", ".join(f"{s} {info['written']}" for s, info in splits.items())
  skipped: dict[str, int] = {}
  for info in splits.values():
    for reason, n in info["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + n
  line = f"{output_dir}: examples written: {written}; "
  line += f"{sum(skipped.values())} skipped"
  if skipped:
    top = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    line += " (" + ", ".join(f"{r} {n}" for r, n in top) + ")"
  upscaled = sum(info["upscaled"] for info in splits.values())
  if upscaled:
    smallest = min(info["min_source_side"] for info in splits.values()
                   if info["min_source_side"] is not None)
    line += (f"; {upscaled} upscaled to {manifest['image_size']} px from "
             f"smaller sources (smallest {smallest} px)")
  # Where a split comes from when its name does not say (test/ as val,
  # FER2013's Usage values).
  sources = [f"{s} = {src}" + (" (no val/)" if src == "test/" else "")
             for s, src in manifest["split_sources"].items()
             if not registry.get(manifest["layout"]).affectnet
             or src.startswith("test/")]
  if sources:
    line += f"; {', '.join(sources)}"
  if manifest["unused_inputs"]:
    line += f"; not used: {', '.join(manifest['unused_inputs'])}"
  return line + f" (this run: {todo_rows} rows in {elapsed:.1f}s)"


def fail_on_empty_splits(output_dir: str, manifest: dict,
                         indexes: dict) -> None:
  """Raises EmptySplitError for a split with zero examples.

  Its (empty) shards and markers are removed, so that a rerun converts it
  again; the other splits' finished shards are kept for the rerun.
  """
  empty = [s for s, info in manifest["splits"].items() if not info["written"]]
  if not empty:
    return
  messages = []
  for split in empty:
    info = manifest["splits"][split]
    for sh in info["shards"]:
      for p in (os.path.join(output_dir, sh["file"]),
                shards.state_path(output_dir, sh["file"])):
        if os.path.exists(p):
          os.remove(p)
    top = sorted(info["skipped"].items(), key=lambda kv: (-kv[1], kv[0]))
    reason, count = top[0] if top else ("none", 0)
    ex = info["skip_examples"].get(reason, [{}])[0]
    others = ", ".join(f"{r} {n}" for r, n in top[1:4])
    messages.append(
        f"split {split!r} ({indexes[split].inputs()[0]}): 0 of {info['rows']} "
        f"rows written; {count} skipped as {reason}"
        + (f" (also {others})" if others else "")
        + f", e.g. row {ex.get('row')} {ex.get('path')!r}: {ex.get('detail')}."
        + " What to do: " + ADVICE.get(
            reason, "see the reasons in docs/DATA.md and fix the input")
        + ".")
  kept = output_state.completed_shards(output_dir)
  raise EmptySplitError(
      "\n".join(messages) + "\nmanifest.json was not written."
      + (" Finished shards of the other splits are kept: a rerun with the same"
         " flags resumes; with other flags, add --overwrite." if kept else ""))


def build(output_dir, input_dir, layout, opts, indexes, shard_counts,
          num_shards, examples_per_shard, missing_splits, unused,
          follow_symlinks, holdout_fraction, holdout_seed,
          folder_numbers="auto", *, tool_version: str) -> dict[str, Any]:
  """Aggregates the per-shard stats into manifest.json's content
  (`tool_version`: the converter's, recorded in it)."""
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
    splits[split] = aggregate(stats, opts.num_classes, len(indexes[split]))
  names = affect_data.label_names(opts.num_classes)
  # Source label -> class id, for the labels the run keeps.
  spec = registry.get(layout)
  mapping = spec.label_mapping or {
      str(c): c for c in range(len(affect_data.LABEL_NAMES_8))}
  return {
      "tool": "data_prep.affectnet",
      "tool_version": tool_version,
      "input_dir": input_dir,
      "layout": layout,
      "dataset": spec.dataset,
      "options": {**dataclasses.asdict(opts), "layout": layout,
                  "num_shards": num_shards,
                  "examples_per_shard": examples_per_shard,
                  "follow_symlinks": follow_symlinks,
                  "folder_numbers": folder_numbers,
                  "holdout_fraction": holdout_fraction,
                  "holdout_seed": holdout_seed},
      "num_classes": opts.num_classes,
      # affectjax's class names, index = class id (the same ids and names for
      # every dataset, so models and datasets are matched by name).
      "label_names": list(names),
      # Source label (as the input writes it) -> class id, for the kept
      # labels (identity for AffectNet).
      "label_mapping": {k: v for k, v in mapping.items()
                        if v < opts.num_classes},
      # The public sets' own names for their labels (None for AffectNet).
      "source_label_names": ({str(k): v for k, v in
                              spec.source_labels.items()}
                             if spec.source_labels else None),
      # Where each split was read from (a folder, or a CSV's Usage value).
      "split_sources": {s: getattr(idx, "source", "") or default_source(
          s, idx, input_dir, layout) for s, idx in indexes.items()},
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
      # Top-level entries of input_dir that no split reads (e.g. test/).
      "unused_inputs": unused,
      # `holdout` (if any) is drawn from the train rows: never in train.
      # The dataset's own holdout (FER2013's PublicTest) is named by its
      # source; otherwise it is drawn from train.
      "holdout": (None if rows.HOLDOUT not in indexes else
                  {"from": indexes[rows.HOLDOUT].source}
                  if not holdout_fraction else
                  {"from": "train", "fraction": holdout_fraction,
                   "seed": holdout_seed, "stratified_by": "expression"}),
      "splits": splits,
  }


def default_source(split: str, idx, input_dir: str, layout: str) -> str:
  """Where a split was read from: its first input, relative to input_dir."""
  if split == rows.HOLDOUT and split not in registry.source_splits(
      layout, input_dir):
    return "train (--holdout_fraction)"
  first = idx.inputs()[0]
  rel = os.path.relpath(first, input_dir)
  return rel + ("/" if os.path.isdir(first) else "")


def aggregate(stats: list, num_classes: int,
              num_rows: int) -> dict[str, Any]:
  """One split's entry of the manifest, from its shards' markers."""
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
  sides = [s["min_source_side"] for s in stats
           if s["min_source_side"] is not None]
  return {
      "rows": num_rows,
      "written": written,
      "skipped": dict(sorted(skipped.items())),
      "skip_examples": dict(sorted(examples.items())),
      "class_counts": class_counts,
      # Written faces whose source crop was smaller than image_size (so
      # upscaled), and the smallest source crop side in px (None if none).
      "upscaled": sum(s["upscaled"] for s in stats),
      "min_source_side": min(sides) if sides else None,
      "num_shards": len(stats),
      "shards": [{"file": s["file"], "num_examples": s["num_examples"],
                  "num_bytes": s["num_bytes"], "sha256": s["sha256"]}
                 for s in stats],
  }
