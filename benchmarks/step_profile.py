r"""Where the affectjax CPU train step spends its time, op by op (XLA:CPU).

Builds the like-for-like jax step of `benchmarks/train_bench.py` (normalize,
custom CNN forward, loss, backward, AdamW; no augmentation), compiles it with
`--xla_dump_to` (to read the optimized HLO), runs `--steps` steps under
`jax.profiler.trace(create_perfetto_trace=True)` and joins the trace's
per-op events with the HLO instructions they ran:

  conv fwd / conv dx / conv dw   forward convolutions, input-gradient and
                                 filter-gradient convolutions (told apart by
                                 the jvp/transpose name JAX gives them and
                                 by their output shape)
  layout transposes/copies       the transposes XLA inserts around them
  maxpool ...                    reduce-window, its argmax-carrying variant
                                 (the plain max-pool's gradient) and
                                 select-and-scatter
  reductions                     fusions that reduce (BatchNorm statistics,
                                 BN/bias gradients)
  elementwise                    everything else (BN apply, ReLU and their
                                 gradients, the optimizer)

Times are each op's duration on the thread that ran it, summed over the
traced steps and divided by --steps; with two cores ops can overlap, so the
total can exceed the step's wall time. Prints the category table and the
per-layer conv table (fwd, dx, dw for each conv shape).

  .venv/bin/python benchmarks/step_profile.py --image_size=48 --impl=fused
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _computations(hlo: str) -> dict[str, str]:
  comps = {}
  for m in re.finditer(r"^(%\S+|ENTRY %\S+) \(.*?\n\}", hlo, re.S | re.M):
    comps[m.group(1).split()[-1]] = m.group(0)
  return comps


def _ops(comps, name, depth=0):
  body = comps.get(name, "")
  ops = re.findall(r"= .*? ([a-z][a-z\-]*)\(", body)
  if depth < 4:
    for c in re.findall(r"(?:calls|to_apply)=(%[\w.\-]+)", body):
      ops += _ops(comps, c, depth + 1)
  return ops


def classify(hlo: str, batch: int) -> dict[str, tuple[str, str]]:
  """ENTRY instruction name -> (category, output shape)."""
  comps = _computations(hlo)
  entry = next(c for c in comps.values() if c.startswith("ENTRY"))
  out = {}
  for line in entry.splitlines():
    m = re.match(r"\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z\-]*)\(", line)
    if not m:
      continue
    name, shape, op = m.groups()
    ops = [op]
    c = re.search(r"calls=(%[\w.\-]+)", line)
    if c:
      ops += _ops(comps, c.group(1))
    meta = re.search(r'op_name="([^"]+)"', line)
    meta = meta.group(1) if meta else ""
    dims = [int(v) for v in re.findall(r"\d+", shape.split("[", 1)[-1].split("]")[0])]
    if "convolution" in ops:
      if "transpose(" not in meta:
        cat = "conv fwd"
      elif len(dims) == 4 and dims[0] == batch and dims[1] > 3:
        cat = "conv dx (input gradient)"
      else:
        cat = "conv dw (filter gradient)"
    elif "dot" in ops:
      cat = "dot (head)"
    elif "reduce-window" in ops or "reduce-window" in name:
      cat = ("maxpool fwd with argmax (plain pool's gradient)" if "s32" in shape
             else "maxpool (reduce-window)")
    elif "select-and-scatter" in ops or "scatter" in ops:
      cat = "maxpool gradient (scatter)"
    elif "reduce" in ops:
      cat = "reductions (BN statistics, BN gradients)"
    elif op in ("transpose", "copy") or "transpose" in name or "copy" in name:
      cat = "layout transposes/copies"
    elif op in ("parameter", "constant", "tuple", "get-tuple-element",
                "bitcast"):
      continue
    else:
      cat = "elementwise (BN apply, ReLU, their gradients, optimizer)"
    out[name] = (cat, shape.split("{")[0])
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=48)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--widths", default="32,64,128,256")
  p.add_argument("--convs_per_stage", type=int, default=2)
  p.add_argument("--impl", default="fused", help="custom CNN impl.")
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  work = tempfile.mkdtemp(prefix="step_profile_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={work}/dump --xla_dump_hlo_as_text")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import train_bench  # pylint: disable=g-import-not-at-top
  step, state, batch = train_bench.make_jax_step(args, args.impl)
  for _ in range(2):
    *state[:], loss = step(*state, batch)
  jax.block_until_ready(loss)
  t = time.perf_counter()
  with jax.profiler.trace(f"{work}/trace", create_perfetto_trace=True):
    for _ in range(args.steps):
      *state[:], loss = step(*state, batch)
    jax.block_until_ready(loss)
  wall = (time.perf_counter() - t) / args.steps * 1e3
  hlo_files = glob.glob(f"{work}/dump/*jit_train_step*.cpu_after_optimizations.txt")
  ops = classify(open(hlo_files[0]).read(), args.batch_size)
  trace = glob.glob(f"{work}/trace/**/perfetto_trace.json.gz", recursive=True)[0]
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_cat, per_op = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in ops:
      per_cat[ops[e["name"]][0]] += e["dur"] / 1e3 / args.steps
      per_op[e["name"]] += e["dur"] / 1e3 / args.steps
  total = sum(per_cat.values())
  print(f"# step_profile: {args.image_size} px, batch {args.batch_size}, widths "
        f"{args.widths} x{args.convs_per_stage}, impl={args.impl}; jax "
        f"{jax.__version__}; traced step wall {wall:.0f} ms (profiler on); "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
  print(f"| category | ms/step | share |\n|---|---:|---:|")
  for cat, ms in per_cat.most_common():
    print(f"| {cat} | {ms:.1f} | {100 * ms / total:.0f}% |")
  print(f"| total of op times | {total:.1f} | 100% |")
  # Per conv shape: fwd / dx / dw.
  rows = collections.defaultdict(lambda: collections.Counter())
  for name, ms in per_op.items():
    cat, shape = ops[name]
    if cat.startswith("conv"):
      rows[cat.split()[1]][shape] += ms
  print("\n| conv | output shape | ms/step |\n|---|---|---:|")
  for kind in ("fwd", "dx", "dw"):
    for shape, ms in sorted(rows[kind].items(), key=lambda kv: -kv[1]):
      print(f"| {kind} | {shape} | {ms:.1f} |")
  print(f"\n(trace and HLO dump kept in {work})")


if __name__ == "__main__":
  main()
