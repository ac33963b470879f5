r"""Benchmarks data_prep: conversion rate, disk size, and read/decode rate.

    python benchmarks/data_prep_bench.py --num_images=2000 --repeats=3 \
        --raw_image_size=480 --image_size=112 --workdir=/tmp/prep_bench

Measures, on a synthetic official-layout tree (generated once, untimed):
  * prep rate, images/s, in-process (1 core) for --encoding=jpeg and raw,
    and with --num_workers=<cores> for jpeg; per-core = rate / workers;
  * a simple peer in the same run: a plain single-process PIL loop that
    opens, crops, resizes and JPEG-encodes each face (no records, no
    checks), and the ratio data_prep / peer;
  * disk size per 1,000 images for each encoding (shard bytes);
  * read rate of `affectjax.data.source` (protobuf + simplejpeg) and of
    tensorflow-datasets' data source (tfds parser + PIL) over the output.
Each figure is the median over --repeats runs. Prints a Markdown table for
docs/BENCHMARKS.md and writes the raw numbers to <workdir>/results.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from affectjax import data as affect_data  # pylint: disable=wrong-import-position
from data_prep import affectnet  # pylint: disable=wrong-import-position
from data_prep import synthetic  # pylint: disable=wrong-import-position


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _prep(raw, out, **kw):
  shutil.rmtree(out, ignore_errors=True)
  return affectnet.prepare(raw, out, progress=False, **kw)


def _pil_peer(raw: str, image_size: int, quality: int) -> int:
  """The simple baseline: PIL open -> crop -> resize -> JPEG, one process."""
  n = 0
  sink = []
  for name in ("training.csv", "validation.csv"):
    with open(os.path.join(raw, name), newline="") as fp:
      for row in csv.DictReader(fp):
        x, y, w, h = (int(row[k]) for k in ("face_x", "face_y", "face_width",
                                             "face_height"))
        with Image.open(os.path.join(raw, synthetic.IMAGES_DIR,
                                     row["subDirectory_filePath"])) as im:
          face = im.convert("RGB").crop((x, y, x + w, y + h)).resize(
              (image_size, image_size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        face.save(buf, format="JPEG", quality=quality)
        sink.append(len(buf.getvalue()))
        n += 1
  return n


def _read_rate(out: str, n_max: int = 2000) -> tuple[float, float]:
  src = affect_data.source(out, "train")
  n = min(len(src), n_max)
  t_ours = _timed(lambda: [src[i] for i in range(n)])
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  theirs = tfds.builder_from_directory(out).as_data_source("train")
  t_tfds = _timed(lambda: [theirs[i] for i in range(n)])
  return n / t_ours, n / t_tfds


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_images", type=int, default=2000)
  ap.add_argument("--raw_image_size", type=int, default=480)
  ap.add_argument("--image_size", type=int, default=112)
  ap.add_argument("--jpeg_quality", type=int, default=90)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--workdir", default="/tmp/data_prep_bench")
  a = ap.parse_args(argv)

  raw = os.path.join(a.workdir, "raw")
  n_val = max(1, a.num_images // 10)
  n_train = a.num_images - n_val
  if not os.path.exists(os.path.join(raw, "validation.csv")):
    synthetic.generate(raw, n_train, n_val, seed=0,
                       image_size=a.raw_image_size, num_workers=a.num_workers)
  n = n_train + n_val
  common = dict(image_size=a.image_size, jpeg_quality=a.jpeg_quality,
                examples_per_shard=256)
  runs = {"jpeg_1proc": [], "raw_1proc": [], "jpeg_workers": [],
          "pil_peer": [], "read_ours": [], "read_tfds": []}
  sizes = {}
  for r in range(a.repeats):
    for enc in ("jpeg", "raw"):
      out = os.path.join(a.workdir, f"out_{enc}")
      t = _timed(lambda: _prep(raw, out, encoding=enc, num_workers=1,
                               **common))
      runs[f"{enc}_1proc"].append(n / t)
      m = json.load(open(os.path.join(out, "manifest.json")))
      total = sum(s["num_bytes"] for sp in m["splits"].values()
                  for s in sp["shards"])
      sizes[enc] = total / n * 1000
    out = os.path.join(a.workdir, "out_jpeg_workers")
    t = _timed(lambda: _prep(raw, out, encoding="jpeg",
                             num_workers=a.num_workers, **common))
    runs["jpeg_workers"].append(n / t)
    runs["pil_peer"].append(
        n / _timed(lambda: _pil_peer(raw, a.image_size, a.jpeg_quality)))
    ours, tfds_rate = _read_rate(os.path.join(a.workdir, "out_jpeg"))
    runs["read_ours"].append(ours)
    runs["read_tfds"].append(tfds_rate)
    print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(
        f"{k}={v[-1]:.0f}/s" for k, v in runs.items()), flush=True)

  med = {k: statistics.median(v) for k, v in runs.items()}
  result = {
      "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores, {platform.platform()}",
      "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
      "num_images": n, "raw_image_size": a.raw_image_size,
      "image_size": a.image_size, "repeats": a.repeats,
      "num_workers": a.num_workers, "median_images_per_s": med,
      "bytes_per_1000_images": sizes, "runs": runs,
  }
  with open(os.path.join(a.workdir, "results.json"), "w") as fp:
    json.dump(result, fp, indent=1)
  w = a.num_workers
  print(f"\nMachine: {result['machine']}\nCommand: {result['command']}\n")
  print("| measurement | median images/s | per core | notes |")
  print("|---|---|---|---|")
  print(f"| data_prep jpeg, 1 process | {med['jpeg_1proc']:.0f} | "
        f"{med['jpeg_1proc']:.0f} | {med['jpeg_1proc'] / med['pil_peer']:.2f}x"
        " the PIL peer |")
  print(f"| data_prep raw, 1 process | {med['raw_1proc']:.0f} | "
        f"{med['raw_1proc']:.0f} | |")
  print(f"| data_prep jpeg, {w} workers | {med['jpeg_workers']:.0f} | "
        f"{med['jpeg_workers'] / w:.0f} | |")
  print(f"| peer: plain PIL loop, 1 process | {med['pil_peer']:.0f} | "
        f"{med['pil_peer']:.0f} | open/crop/resize/JPEG only |")
  print(f"| read: affectjax.data.source | {med['read_ours']:.0f} | "
        f"{med['read_ours']:.0f} | {med['read_ours'] / med['read_tfds']:.1f}x"
        " tfds |")
  print(f"| read: tfds data source | {med['read_tfds']:.0f} | "
        f"{med['read_tfds']:.0f} | tfds parser + PIL |")
  print("\n| encoding | disk per 1,000 images |\n|---|---|")
  for enc, b in sizes.items():
    print(f"| {enc} ({a.image_size}px) | {b / 1e6:.2f} MB |")


if __name__ == "__main__":
  main()
