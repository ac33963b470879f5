r"""The JPEG path's img/s against its decode-thread count (1-4), interleaved.

Does the host path scale to the cores, and does oversubscribing them help or
hurt? Uses the data `benchmarks/input_bench.py` prepared (run that once
first), the record-index JPEG path (pixel cache off), batch 64, 2 s per
measurement after 5 warm-up batches, 3 interleaved rounds, medians.

  .venv/bin/python benchmarks/input_threads.py [--root=/tmp/affectjax_input_bench]
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(root: str, size: int, threads: int, seconds: float = 2.0) -> float:
  from affectjax import config_base, input_pipeline  # pylint: disable=g-import-not-at-top
  c = config_base.get_base_config()
  c.data.dir, c.image_size = f"{root}/p{size}_jpeg", size
  c.data.cache, c.data.num_workers = f"{root}/cache", threads
  it = iter(input_pipeline.train_dataset(c, local_batch_size=64))
  for _ in range(5):
    next(it)
  t, n = time.perf_counter(), 0
  while time.perf_counter() - t < seconds:
    next(it)
    n += 64
  r = n / (time.perf_counter() - t)
  it.close()
  return r


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default="/tmp/affectjax_input_bench")
  p.add_argument("--sizes", default="112,224")
  p.add_argument("--threads", default="1,2,3,4")
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  sys.path.insert(0, REPO)
  from affectjax import pixel_cache  # pylint: disable=g-import-not-at-top
  real = pixel_cache.plan  # The record index only: the JPEG path.
  pixel_cache.plan = lambda *args: dataclasses.replace(real(*args),
                                                       pixels=False)
  sizes = [int(s) for s in a.sizes.split(",")]
  threads = [int(t) for t in a.threads.split(",")]
  runs = {}
  for _ in range(a.repeats):
    for size in sizes:
      for t in threads:
        runs.setdefault((size, t), []).append(rate(a.root, size, t))
  print(f"load average {os.getloadavg()}")
  print("| threads | " + " | ".join(f"img/s {s} px (runs)" for s in sizes) + " |")
  print("|---|" + "---|" * len(sizes))
  for t in threads:
    print(f"| {t} | " + " | ".join(
        f"{statistics.median(runs[s, t]):,.0f} ("
        + ", ".join(f"{x:,.0f}" for x in runs[s, t]) + ")" for s in sizes)
          + " |")


if __name__ == "__main__":
  main()
