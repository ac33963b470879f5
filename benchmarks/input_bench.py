r"""Host input path: affectjax vs tf.data vs a torch DataLoader, same images, same run.

Every pipeline turns the same stored face JPEGs into uint8 batches of
`--batch_size` (no augmentation: affectjax augments on the device, and the
peers are timed as the fastest plain decode pipeline each offers):

  ceiling          simplejpeg (libjpeg-turbo) decode alone, one thread, bytes
                   already in memory: the per-core decode rate. Every JPEG
                   decode here uses libjpeg-turbo's accurate integer IDCT,
                   so all pipelines deliver bit-identical pixels (tf.data
                   asks for it with dct_method='INTEGER_ACCURATE'; its
                   default fast IDCT differs by up to 7 levels).
  affectjax_jpeg   `input_pipeline.train_dataset` with its defaults (2 threads
                   per usable core) over the ArrayRecord shards
                   (`--encoding=jpeg`).
  affectjax_raw    the same over `--encoding=raw` shards (no decode).
  tf_data          list_files -> read_file -> decode_jpeg (AUTOTUNE) -> batch
                   -> prefetch(AUTOTUNE) over the same JPEG bytes written as
                   files.
  torch            torch DataLoader (workers = usable cores, simplejpeg decode
                   of the same files, default collate to a uint8 tensor).

Each measurement runs in a fresh subprocess (no shared thread pools); the
pipelines are interleaved round-robin `--repeats` times so load from other
work hits them alike, and the median img/s is reported.

  .venv-bench/bin/python benchmarks/input_bench.py --prepare --root=/tmp/affectjax_input_bench
  .venv-bench/bin/python benchmarks/input_bench.py --root=/tmp/affectjax_input_bench --profile

`--prepare` draws 2,000 synthetic faces (256 px) and prepares them at 112 and
224 px as JPEG and raw ArrayRecords (`python -m data_prep.affectnet`);
`--profile` prints a cProfile summary of one affectjax decode thread. Needs the
`bench` extra (tensorflow-cpu, torch). Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("ceiling", "affectjax_jpeg", "affectjax_raw", "tf_data", "torch")


def _dirs(root, size):
  return (os.path.join(root, f"p{size}_jpeg"), os.path.join(root, f"p{size}_raw"),
          os.path.join(root, f"jpeg_files_{size}"))


def prepare(root: str, sizes) -> None:
  """Synthetic faces -> ArrayRecords (jpeg, raw) per size -> JPEG files."""
  sys.path.insert(0, REPO)
  from affectjax import data  # pylint: disable=g-import-not-at-top
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  raw_tree = os.path.join(root, "raw")
  if not os.path.exists(os.path.join(raw_tree, "training.csv")):
    synthetic.generate(raw_tree, num_train=2000, num_val=100, seed=0,
                       image_size=256)
  for size in sizes:
    jpeg_dir, raw_dir, files = _dirs(root, size)
    for out, enc in ((jpeg_dir, "jpeg"), (raw_dir, "raw")):
      if not os.path.exists(os.path.join(out, data.MANIFEST_NAME)):
        affectnet.prepare(raw_tree, out, image_size=size, encoding=enc,
                          progress=False)
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
def w_ceiling(a):
  import simplejpeg  # pylint: disable=g-import-not-at-top
  files = _dirs(a.root, a.size)[2]
  blobs = [open(os.path.join(files, f), "rb").read()
           for f in sorted(os.listdir(files)) if f.endswith(".jpg")]
  state = {"i": 0}

  def batch():
    for _ in range(a.batch_size):
      simplejpeg.decode_jpeg(blobs[state["i"] % len(blobs)], colorspace="RGB")
      state["i"] += 1
  return batch


def _affectjax(a, data_dir):
  sys.path.insert(0, REPO)
  from affectjax import input_pipeline  # pylint: disable=g-import-not-at-top
  from affectjax import config_base  # pylint: disable=g-import-not-at-top
  c = config_base.get_base_config()
  c.data.dir, c.image_size = data_dir, a.size
  c.data.num_workers = 0  # The default: 2 threads per usable core.
  it = iter(input_pipeline.train_dataset(c, local_batch_size=a.batch_size))
  return lambda: next(it)


def w_affectjax_jpeg(a):
  return _affectjax(a, _dirs(a.root, a.size)[0])


def w_affectjax_raw(a):
  return _affectjax(a, _dirs(a.root, a.size)[1])


def w_tf_data(a):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = tf.data.Dataset.list_files(
      os.path.join(_dirs(a.root, a.size)[2], "*.jpg"), shuffle=True, seed=0)
  ds = (files.repeat()
        .map(lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3,
                                         dct_method="INTEGER_ACCURATE"),
             num_parallel_calls=tf.data.AUTOTUNE)
        .batch(a.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE))
  it = iter(ds)
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
        return torch.from_numpy(simplejpeg.decode_jpeg(f.read(),
                                                       colorspace="RGB"))

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
  batch = globals()["w_" + a.worker](a)
  for _ in range(a.warmup):
    batch()
  t, c = time.perf_counter(), _cpu_seconds()
  for _ in range(a.batches):
    batch()
  dt, dc = time.perf_counter() - t, _cpu_seconds() - c
  n = a.batches * a.batch_size
  print(json.dumps({"img_per_s": n / dt, "cpu_ms_per_img": dc / n * 1e3}),
        flush=True)
  os._exit(0)  # Skip slow interpreter teardown of tf/torch pools.


def profile(a) -> None:
  """cProfile of one decode thread of the affectjax path (in-process)."""
  import cProfile  # pylint: disable=g-import-not-at-top
  import pstats  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from affectjax import config_base, input_pipeline  # pylint: disable=g-import-not-at-top
  for size in a.sizes:
    for enc_dir in _dirs(a.root, size)[:2]:
      c = config_base.get_base_config()
      c.data.dir, c.image_size, c.data.num_workers = enc_dir, size, 1
      ds = input_pipeline.train_dataset(c, local_batch_size=a.batch_size)
      parent = ds._parent  # pylint: disable=protected-access  # the batch MapDataset
      parent[0]
      prof = cProfile.Profile()
      t = time.perf_counter()
      prof.enable()
      for k in range(1, a.batches + 1):
        parent[k]
      prof.disable()
      dt = time.perf_counter() - t
      n = a.batches * a.batch_size
      print(f"\n== {os.path.basename(enc_dir)}: {dt / n * 1e3:.3f} ms/image in "
            f"one thread under cProfile ({n / dt:.0f} img/s)")
      pstats.Stats(prof).sort_stats("tottime").print_stats(8)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="/tmp/affectjax_input_bench")
  p.add_argument("--sizes", default="112,224")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=60, help="Timed batches.")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", default=",".join(NAMES))
  p.add_argument("--prepare", action="store_true")
  p.add_argument("--profile", action="store_true")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
  a = p.parse_args()
  a.sizes = [int(s) for s in a.sizes.split(",")]
  if a.worker:
    return _worker(a)
  if a.prepare:
    prepare(a.root, a.sizes)
  if a.profile:
    return profile(a)
  names = [n for n in a.only.split(",") if n]
  rates = {(s, n): [] for s in a.sizes for n in names}
  cpu = {(s, n): [] for s in a.sizes for n in names}
  for _ in range(a.repeats):
    for size in a.sizes:
      for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}",
               f"--size={size}", f"--root={a.root}",
               f"--batch_size={a.batch_size}", f"--batches={a.batches}",
               f"--warmup={a.warmup}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if out.returncode:
          print(f"{size}px {name}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
          continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rates[(size, name)].append(result["img_per_s"])
        cpu[(size, name)].append(result["cpu_ms_per_img"])
        print(f"{size}px {name}: {result['img_per_s']:,.0f} img/s, "
              f"{result['cpu_ms_per_img']:.3f} CPU ms/img", flush=True)
  print(f"\n{_cores()} usable cores, batch {a.batch_size}, {a.batches} timed "
        f"batches, median of {a.repeats} interleaved runs (img/s)")
  print("| pipeline | " + " | ".join(f"{s} px" for s in a.sizes) + " |")
  print("|---|" + "---:|" * len(a.sizes))
  med = {k: statistics.median(v) for k, v in rates.items() if v}
  for name in names:
    cells = []
    for s in a.sizes:
      runs = rates[(s, name)]
      cells.append(f"{med[(s, name)]:,.0f} ({', '.join(f'{r:,.0f}' for r in runs)})"
                   if runs else "failed")
    print(f"| {name} | " + " | ".join(cells) + " |")
  print("\nCPU ms per image (all threads and worker processes; median)")
  for name in names:
    print(f"| {name} | " + " | ".join(
        f"{statistics.median(cpu[(s, name)]):.3f}" if cpu[(s, name)] else "-"
        for s in a.sizes) + " |")
  for ours in ("affectjax_jpeg", "affectjax_raw"):
    for peer in ("tf_data", "torch", "ceiling"):
      r = [f"{med[(s, ours)] / med[(s, peer)]:.2f}x" for s in a.sizes
           if (s, ours) in med and (s, peer) in med]
      if r:
        print(f"{ours} / {peer}: " + ", ".join(r))


if __name__ == "__main__":
  main()
