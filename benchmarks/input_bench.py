r"""Host input path: affectjax vs tf.data vs a torch DataLoader, same images, same run.

Every pipeline turns the same stored faces into uint8 batches of
`--batch_size` (no augmentation: affectjax augments on the device, and the
peers are timed as the fastest plain pipeline each offers). Every JPEG
decode uses libjpeg-turbo's accurate integer IDCT, so all pipelines deliver
bit-identical pixels (tf.data asks for it with dct_method='INTEGER_ACCURATE').

  decode_1core      ceiling: simplejpeg decode alone, one thread, bytes in
                    memory, into a batch buffer: the per-core decode rate.
  copy_1core        ceiling: np.copyto of a batch's bytes (b x S x S x 3),
                    one thread, walking the decoded split: the per-core
                    memory-copy rate.
  affectjax_cached  `input_pipeline.train_dataset` (its defaults) with the
                    pixel cache built: every epoch after the first.
  affectjax_jpeg    the same, pixel cache off: JPEGs decode from the record
                    index (the first epoch, or data too large to cache).
  affectjax_records the same with --config.data.cache=none: read, parse and
                    decode the ArrayRecords.
  affectjax_raw     `--encoding=raw` shards through the record index.
  affectjax_noop    affectjax_jpeg with the decode replaced by a no-op: the
                    host path's own rate, i.e. what one process can feed
                    before decoding is counted (its GIL ceiling).
  tf_data           list_files -> read_file -> decode_jpeg (AUTOTUNE) ->
                    batch -> prefetch(AUTOTUNE), over the same JPEG bytes
                    written as files.
  tf_cache          the same with .cache() of the decoded images in memory,
                    then shuffle and repeat: timed after a whole first epoch.
  torch             torch DataLoader, workers = usable cores, simplejpeg
                    decode of the same files, default collate.

Each pipeline runs in a fresh subprocess (no shared thread pools) at every
size; the pipelines are interleaved round-robin `--repeats` times so load
from other work hits them alike, and medians are reported. The machine's
load average (`uptime`) is printed before and after. The last lines are a
Markdown table of the issue's goals, ready to paste into docs/BENCHMARKS.md.

  .venv/bin/pip install torch==2.13.0 -e '.[bench]'   # tensorflow-cpu, torch
  .venv/bin/python benchmarks/input_bench.py          # prepares, then measures
  .venv/bin/python benchmarks/input_bench.py --profile

The first run draws 2,000 synthetic faces (256 px), prepares them at 112 and
224 px as JPEG and raw ArrayRecords (`python -m data_prep.affectnet`), writes
the JPEGs as files for the peers and builds affectjax's caches, all under
`--root`; later runs reuse them. `--profile` prints a cProfile summary of one
affectjax thread per path. Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("decode_1core", "copy_1core", "affectjax_cached", "affectjax_jpeg",
         "affectjax_records", "affectjax_raw", "affectjax_noop", "tf_data",
         "tf_cache", "torch")


def _dirs(root, size):
  return (os.path.join(root, f"p{size}_jpeg"), os.path.join(root, f"p{size}_raw"),
          os.path.join(root, f"jpeg_files_{size}"))


def _cache_dir(root):
  return os.path.join(root, "cache")


def _config(a, data_dir, size, cache):
  sys.path.insert(0, REPO)
  from affectjax import config_base  # pylint: disable=g-import-not-at-top
  c = config_base.get_base_config()
  c.data.dir, c.image_size, c.data.cache = data_dir, size, cache
  return c


def prepare(a) -> None:
  """Synthetic faces -> ArrayRecords (jpeg, raw) per size -> JPEG files ->
  affectjax's caches. Skips whatever exists."""
  sys.path.insert(0, REPO)
  from affectjax import data, input_pipeline  # pylint: disable=g-import-not-at-top
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  raw_tree = os.path.join(a.root, "raw")
  if not os.path.exists(os.path.join(raw_tree, "training.csv")):
    synthetic.generate(raw_tree, num_train=2000, num_val=100, seed=0,
                       image_size=256)
  for size in a.sizes:
    jpeg_dir, raw_dir, files = _dirs(a.root, size)
    for out, enc in ((jpeg_dir, "jpeg"), (raw_dir, "raw")):
      if not os.path.exists(os.path.join(out, data.MANIFEST_NAME)):
        affectnet.prepare(raw_tree, out, image_size=size, encoding=enc,
                          progress=False)
      # Build the record index and pixel cache outside any timing.
      input_pipeline.train_dataset(
          _config(a, out, a.image_size or size, _cache_dir(a.root)),
          local_batch_size=a.batch_size)
    if not os.path.exists(os.path.join(files, ".done")):
      os.makedirs(files, exist_ok=True)
      src = data.source(jpeg_dir, "train")
      for i, rec in enumerate(src.read_records(range(len(src)))):
        image = data.parse_training_fields(rec)[0]
        with open(os.path.join(files, f"{i:06d}.jpg"), "wb") as f:
          f.write(bytes(image))  # The very bytes the records hold.
      open(os.path.join(files, ".done"), "w").close()


def _cores() -> int:
  return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------
# Workers: each returns a function producing one batch.
# ---------------------------------------------------------------------------
def _jpeg_blobs(a):
  files = _dirs(a.root, a.size)[2]
  return [open(os.path.join(files, f), "rb").read()
          for f in sorted(os.listdir(files)) if f.endswith(".jpg")]


def w_decode_1core(a):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import simplejpeg  # pylint: disable=g-import-not-at-top
  blobs = _jpeg_blobs(a)
  out = np.empty((a.batch_size, a.size, a.size, 3), np.uint8)
  state = {"i": 0}

  def batch():
    for row in range(a.batch_size):
      simplejpeg.decode_jpeg(blobs[state["i"] % len(blobs)], colorspace="RGB",
                             fastdct=False, buffer=out[row])
      state["i"] += 1
  return batch


def w_copy_1core(a):
  import numpy as np  # pylint: disable=g-import-not-at-top
  b = a.batch_size
  pixels = np.random.default_rng(0).integers(
      0, 256, (2000 // b * b, a.size, a.size, 3), dtype=np.uint8)
  out = np.empty((b, a.size, a.size, 3), np.uint8)
  state = {"i": 0}

  def batch():
    start = state["i"] % len(pixels)
    np.copyto(out, pixels[start:start + b])
    state["i"] += b
  return batch


def _affectjax(a, data_dir, cache, pixels=True, noop=False):
  sys.path.insert(0, REPO)
  from affectjax import batch_loaders, input_pipeline, pixel_cache  # pylint: disable=g-import-not-at-top
  if not pixels:  # The record index only: the JPEG path.
    real = pixel_cache.plan
    pixel_cache.plan = lambda *args: dataclasses.replace(real(*args),
                                                         pixels=False)
  if noop:
    batch_loaders._Decoder.into = lambda self, image, out, index: None  # pylint: disable=protected-access
  # --image_size below the stored size: the DCT-scaled decode a smaller
  # model's host path does (e.g. 320 px JPEGs for a 112 px model).
  c = _config(a, data_dir, a.image_size or a.size, cache)
  it = iter(input_pipeline.train_dataset(c, local_batch_size=a.batch_size))

  def batch():
    return next(it)
  batch.close = it.close  # Its threads stop before the next size is timed.
  return batch


def w_affectjax_cached(a):
  return _affectjax(a, _dirs(a.root, a.size)[0], _cache_dir(a.root))


def w_affectjax_jpeg(a):
  return _affectjax(a, _dirs(a.root, a.size)[0], _cache_dir(a.root),
                    pixels=False)


def w_affectjax_records(a):
  return _affectjax(a, _dirs(a.root, a.size)[0], "none")


def w_affectjax_raw(a):
  return _affectjax(a, _dirs(a.root, a.size)[1], _cache_dir(a.root),
                    pixels=False)


def w_affectjax_noop(a):
  return _affectjax(a, _dirs(a.root, a.size)[0], _cache_dir(a.root),
                    pixels=False, noop=True)


def _tf_files(a):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf, os.path.join(_dirs(a.root, a.size)[2], "*.jpg")


def _tf_decode(tf):
  return lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3,
                                     dct_method="INTEGER_ACCURATE")


def w_tf_data(a):
  tf, pattern = _tf_files(a)
  ds = (tf.data.Dataset.list_files(pattern, shuffle=True, seed=0).repeat()
        .map(_tf_decode(tf), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(a.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE))
  it = iter(ds)
  return lambda: next(it)


def w_tf_cache(a):
  tf, pattern = _tf_files(a)
  files = tf.data.Dataset.list_files(pattern, shuffle=False)
  n = int(files.cardinality())
  ds = (files.map(_tf_decode(tf), num_parallel_calls=tf.data.AUTOTUNE)
        .cache()  # Decoded uint8 images, in memory.
        .shuffle(n, seed=0, reshuffle_each_iteration=True).repeat()
        .batch(a.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE))
  it = iter(ds)
  for _ in range(n // a.batch_size + 1):  # The first epoch fills the cache.
    next(it)
  return lambda: next(it)


def w_torch(a):
  import simplejpeg  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  files = _dirs(a.root, a.size)[2]
  paths = sorted(os.path.join(files, f) for f in os.listdir(files)
                 if f.endswith(".jpg"))

  class Faces(torch.utils.data.Dataset):
    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      with open(paths[i], "rb") as f:
        return torch.from_numpy(simplejpeg.decode_jpeg(
            f.read(), colorspace="RGB", fastdct=False))

  loader = torch.utils.data.DataLoader(
      Faces(), batch_size=a.batch_size, shuffle=True, drop_last=True,
      num_workers=_cores(), persistent_workers=True, prefetch_factor=4)

  def forever():
    while True:
      yield from loader
  it = forever()
  return lambda: next(it)


def _cpu_seconds() -> float:
  """CPU time of this process (all threads) and of its live children
  (torch's DataLoader workers), from /proc."""
  total = time.process_time()
  tick = os.sysconf("SC_CLK_TCK")
  for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as f:
      for pid in f.read().split():
        try:
          with open(f"/proc/{pid}/stat") as st:
            fields = st.read().rsplit(")", 1)[1].split()
          total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
          pass
  return total


def _worker(a) -> None:
  """Times one pipeline at every size: warm-up, then batches for at least
  `--seconds` (and `--min_batches`)."""
  results = {}
  for size in a.sizes:
    a.size = size
    batch = globals()["w_" + a.worker](a)
    for _ in range(a.warmup):
      batch()
    t, c, k = time.perf_counter(), _cpu_seconds(), 0
    while k < a.min_batches or time.perf_counter() - t < a.seconds:
      batch()
      k += 1
    dt, dc = time.perf_counter() - t, _cpu_seconds() - c
    getattr(batch, "close", lambda: None)()
    n = k * a.batch_size
    results[size] = {"img_per_s": n / dt, "cpu_ms_per_img": dc / n * 1e3}
  print(json.dumps(results), flush=True)
  os._exit(0)  # Skip slow interpreter teardown of tf/torch pools.


def profile(a) -> None:
  """cProfile of one affectjax thread per path (in-process)."""
  import cProfile  # pylint: disable=g-import-not-at-top
  import pstats  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from affectjax import input_pipeline, pixel_cache  # pylint: disable=g-import-not-at-top
  real = pixel_cache.plan
  for size in a.sizes:
    for name, data_dir, cache, pixels in (
        ("records", _dirs(a.root, size)[0], "none", False),
        ("jpeg (record index)", _dirs(a.root, size)[0], _cache_dir(a.root),
         False),
        ("raw (record index)", _dirs(a.root, size)[1], _cache_dir(a.root),
         False),
        ("cached", _dirs(a.root, size)[0], _cache_dir(a.root), True)):
      pixel_cache.plan = lambda *args, p=pixels: dataclasses.replace(
          real(*args), pixels=p and real(*args).pixels)
      c = _config(a, data_dir, size, cache)
      c.data.num_workers = 1
      ds = input_pipeline.train_dataset(c, local_batch_size=a.batch_size)
      parent = ds._parent._parent  # pylint: disable=protected-access  # the batch MapDataset
      parent[0]
      prof = cProfile.Profile()
      t = time.perf_counter()
      prof.enable()
      for k in range(1, a.min_batches + 1):
        parent[k]
      prof.disable()
      dt = time.perf_counter() - t
      n = a.min_batches * a.batch_size
      print(f"\n== {size} px {name}: {dt / n * 1e3:.4f} ms/image in one thread "
            f"under cProfile ({n / dt:,.0f} img/s)")
      pstats.Stats(prof).sort_stats("tottime").print_stats(6)


def _uptime() -> str:
  with open("/proc/loadavg") as f:
    return "load average " + ", ".join(f.read().split()[:3])


def _goals(med, sizes, cores) -> list[str]:
  """The issue's goals as a Markdown table (a missing pipeline: '-')."""
  def ratio(num, den, scale=1.0, fmt="{:.2f}x"):
    cells = []
    for s in sizes:
      if (s, num) in med and (s, den) in med:
        cells.append(fmt.format(med[(s, num)] / (scale * med[(s, den)])))
      else:
        cells.append("-")
    return cells

  rows = [
      ("cached / tf.data JPEG", ratio("affectjax_cached", "tf_data"), ">= 5x"),
      ("cached / tf.data .cache()", ratio("affectjax_cached", "tf_cache"),
       ">= 1.5x"),
      (f"cached / ({cores} cores x np.copyto 1 core)",
       ratio("affectjax_cached", "copy_1core", cores, "{:.0%}"), ">= 50%"),
      (f"JPEG / ({cores} cores x simplejpeg 1 core)",
       ratio("affectjax_jpeg", "decode_1core", cores, "{:.0%}"), ">= 85%"),
      ("JPEG / tf.data JPEG", ratio("affectjax_jpeg", "tf_data"), ">= 1.2x"),
      ("no-op decode, 1 process (img/s)",
       [f"{med[(s, 'affectjax_noop')]:,.0f}" if (s, "affectjax_noop") in med
        else "-" for s in sizes], ">= 50,000"),
  ]
  out = ["| goal | " + " | ".join(f"{s} px" for s in sizes) + " | target |",
         "|---|" + "---:|" * len(sizes) + "---|"]
  out += [f"| {g} | " + " | ".join(c) + f" | {t} |" for g, c, t in rows]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="/tmp/affectjax_input_bench")
  p.add_argument("--sizes", default="112,224")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--seconds", type=float, default=1.5,
                 help="Timed seconds per pipeline and size (at least).")
  p.add_argument("--min_batches", type=int, default=20)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--only", default=",".join(NAMES))
  p.add_argument("--profile", action="store_true")
  p.add_argument("--image_size", type=int, default=0,
                 help="Training size of the affectjax pipelines (0 = each "
                 "stored size); smaller sizes decode at a DCT scale.")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  a.sizes = [int(s) for s in a.sizes.split(",")]
  if a.worker:
    return _worker(a)
  prepare(a)
  if a.profile:
    return profile(a)
  names = [n for n in a.only.split(",") if n]
  rates = {(s, n): [] for s in a.sizes for n in names}
  cpu = {(s, n): [] for s in a.sizes for n in names}
  load_before = _uptime()
  print(f"before: {load_before}", flush=True)
  for _ in range(a.repeats):
    for name in names:
      cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}",
             f"--sizes={','.join(map(str, a.sizes))}", f"--root={a.root}",
             f"--batch_size={a.batch_size}", f"--seconds={a.seconds}",
             f"--min_batches={a.min_batches}", f"--warmup={a.warmup}",
             f"--image_size={a.image_size}"]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
      if out.returncode:
        print(f"{name}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
        continue
      result = json.loads(out.stdout.strip().splitlines()[-1])
      for s in a.sizes:
        r = result[str(s)]
        rates[(s, name)].append(r["img_per_s"])
        cpu[(s, name)].append(r["cpu_ms_per_img"])
        print(f"{s}px {name}: {r['img_per_s']:,.0f} img/s, "
              f"{r['cpu_ms_per_img']:.4f} CPU ms/img", flush=True)
  load_after = _uptime()
  cores = _cores()
  med = {k: statistics.median(v) for k, v in rates.items() if v}
  print(f"\n{cores} usable cores, batch {a.batch_size}, >= {a.seconds} s per "
        f"measurement, median of {a.repeats} interleaved runs; "
        f"before: {load_before}; after: {load_after}\n")
  print("| pipeline | " + " | ".join(f"img/s {s} px (runs)" for s in a.sizes)
        + " | CPU ms/img " + " / ".join(map(str, a.sizes)) + " |")
  print("|---|" + "---|" * (len(a.sizes) + 1))
  for name in names:
    cells = []
    for s in a.sizes:
      runs = rates[(s, name)]
      cells.append(f"{med[(s, name)]:,.0f} ({', '.join(f'{r:,.0f}' for r in runs)})"
                   if runs else "failed")
    cpu_cell = " / ".join(f"{statistics.median(cpu[(s, name)]):.4f}"
                          if cpu[(s, name)] else "-" for s in a.sizes)
    print(f"| {name} | " + " | ".join(cells) + f" | {cpu_cell} |")
  print("\nGoals, from the img/s medians above:\n")
  print("\n".join(_goals(med, a.sizes, cores)))
  # The same goals from CPU time per image, which load from other work
  # changes far less than img/s: an idle machine runs a pipeline that
  # scales at cores / (CPU s per image), a one-core ceiling at 1 / (CPU s
  # per image); the no-op decode counts as one core (as if all of its time
  # held the GIL: a lower bound of the one-process ceiling).
  eff = {}
  for (s, name), runs in cpu.items():
    if runs:
      per_core = 1e3 / statistics.median(runs)
      one_core = name.endswith("_1core") or name == "affectjax_noop"
      eff[(s, name)] = per_core if one_core else cores * per_core
  print("\nGoals, from CPU time per image (idle-machine estimate):\n")
  print("\n".join(_goals(eff, a.sizes, cores)))


if __name__ == "__main__":
  main()
