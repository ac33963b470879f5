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
  return [op for op, _ in _op_lines(comps, name, depth)]


def _op_lines(comps, name, depth=0):
  """(opcode, instruction line) of computation `name` and what it calls."""
  body = comps.get(name, "")
  ops = [(m.group(1), m.group(0)) for m in
         re.finditer(r"= .*? ([a-z][a-z\-]*)\(.*", body)]
  if depth < 4:
    for c in re.findall(r"(?:calls|to_apply)=(%[\w.\-]+)", body):
      ops += _op_lines(comps, c, depth + 1)
  return ops


def _group_count(lines, attr):
  for op, line in lines:
    if op == "convolution":
      m = re.search(attr + r"=(\d+)", line)
      if m and int(m.group(1)) > 1:
        return int(m.group(1))
  return 0


def classify(hlo: str, batch: int, depthwise: bool = False
             ) -> dict[str, tuple[str, str]]:
  """ENTRY instruction name -> (category, output shape).

  `depthwise`: the model has depthwise convolutions (EfficientNet), whose
  filter gradient XLA:CPU may rewrite as a dense (C, k, k, C) convolution.
  """
  comps = _computations(hlo)
  entry = next(c for c in comps.values() if c.startswith("ENTRY"))
  out = {}
  for line in entry.splitlines():
    m = re.match(r"\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z\-]*)\(", line)
    if not m:
      continue
    name, shape, op = m.groups()
    lines = [(op, line)]
    c = re.search(r"calls=(%[\w.\-]+)", line)
    if c:
      lines += _op_lines(comps, c.group(1))
    ops = [o for o, _ in lines]
    meta = re.search(r'op_name="([^"]+)"', line)
    meta = meta.group(1) if meta else ""
    dims = [int(v) for v in re.findall(r"\d+", shape.split("[", 1)[-1].split("]")[0])]
    # Squeeze-excite works on (B, 1, 1, C) maps: its 1x1 convs, their
    # gradients, and the spatial means / gate gradients reduced to them.
    se_shaped = (len(dims) == 4 and dims[0] == batch and dims[1:3] == [1, 1]
                 ) or (len(dims) == 2 and dims[0] == batch)
    grouped = _group_count(lines, "feature_group_count")
    batch_grouped = _group_count(lines, "batch_group_count")
    # affectjax/models/depthwise.py names its ops (jax.named_scope); the
    # efficientnet module names its squeeze-excite.
    named = re.search(r"depthwise_(fwd|dx|dw)", meta)
    if named:
      cat = {"fwd": "depthwise conv fwd", "dx": "depthwise conv dx (input gradient)",
             "dw": "depthwise conv dw (filter gradient)"}[named.group(1)]
    elif "squeeze_excite" in meta:
      cat = "squeeze-excite (1x1 convs on pooled maps, their gradients)"
    elif "convolution" in ops and se_shaped:
      cat = "squeeze-excite (1x1 convs on pooled maps, their gradients)"
    elif "convolution" in ops and (grouped or batch_grouped):
      # Depthwise: feature_group_count = channels (fwd, dx); XLA writes the
      # filter gradient with batch_group_count = channels.
      if batch_grouped:
        cat = "depthwise conv dw (filter gradient)"

      elif "transpose(" in meta:
        cat = "depthwise conv dx (input gradient)"
      else:
        cat = "depthwise conv fwd"
    elif "convolution" in ops:
      if (depthwise and len(dims) == 4 and dims[0] == dims[3] != batch
          and 1 < dims[1] == dims[2] <= 7):
        # XLA:CPU's rewrite of a depthwise filter gradient (lax's, impl
        # 'plain'): a dense (C, k, k, C) convolution whose diagonal is kept.
        cat = "depthwise conv dw (filter gradient)"
      elif "transpose(" not in meta:
        cat = "conv fwd"
      elif len(dims) == 4 and dims[0] == batch and dims[1] > 3:
        cat = "conv dx (input gradient)"
      else:
        cat = "conv dw (filter gradient)"
    elif "reduce" in ops and se_shaped:
      cat = "squeeze-excite (1x1 convs on pooled maps, their gradients)"
    elif "dot" in ops:
      cat = "dot (head; EfficientNet's 1x1 convs under impl=fused)"
    elif "reduce-window" in ops or "reduce-window" in name:
      cat = ("maxpool fwd with argmax (plain pool's gradient)" if "s32" in shape
             else "maxpool (reduce-window)")
    elif "select-and-scatter" in ops or "scatter" in ops:
      cat = "maxpool gradient (scatter)"
    elif "reduce" in ops:
      cat = "reductions (BatchNorm statistics and gradients, bias gradients)"
    elif op in ("transpose", "copy") or "transpose" in name or "copy" in name:
      cat = "layout transposes/copies"
    elif op in ("parameter", "constant", "tuple", "get-tuple-element",
                "bitcast"):
      continue
    elif "silu" in meta or "logistic" in ops:
      cat = "swish / sigmoid (and what XLA fused with them)"
    else:
      cat = "elementwise (BN apply, ReLU, their gradients, optimizer)"
    out[name] = (cat, shape.split("{")[0])
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="custom_cnn",
                 choices=("custom_cnn", "vgg16", "efficientnet_b3"))
  p.add_argument("--image_size", type=int, default=48)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--widths", default="32,64,128,256")
  p.add_argument("--convs_per_stage", type=int, default=2)
  p.add_argument("--impl", default="fused",
                 help="The model's impl (config.model.kwargs.impl); "
                      "'impl:bfloat16' computes in bfloat16.")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=15,
                 help="Rows of the per-shape conv and per-op tables.")
  args = p.parse_args()
  work = tempfile.mkdtemp(prefix="step_profile_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={work}/dump --xla_dump_hlo_as_text")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # As the trainer: Eigen convolutions (affectjax/xla_cpu.py). Their thunks
  # hand the work to Eigen's thread pool and are traced as dispatch only, so
  # their time is the step's wall time less the listed ops; set
  # XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution
  # to profile XLA's YNNPACK convolutions op by op.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from affectjax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.configure()  # (The import set malloc as the trainer has it.)
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
  ops = classify(open(hlo_files[0]).read(), args.batch_size,
                 depthwise=args.model == "efficientnet_b3")
  trace = glob.glob(f"{work}/trace/**/perfetto_trace.json.gz", recursive=True)[0]
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_cat, per_op = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in ops:
      per_cat[ops[e["name"]][0]] += e["dur"] / 1e3 / args.steps
      per_op[e["name"]] += e["dur"] / 1e3 / args.steps
  total = sum(per_cat.values())
  model = (f"custom CNN widths {args.widths} x{args.convs_per_stage}"
           if args.model == "custom_cnn" else args.model)
  print(f"# step_profile: {model}, {args.image_size} px, batch "
        f"{args.batch_size}, impl={args.impl}; jax "
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
    if cat.startswith(("conv", "depthwise")):
      rows[cat.split(" (")[0]][shape] += ms
  print("\n| conv | output shape | ms/step |\n|---|---|---:|")
  for kind in sorted(rows):
    for shape, ms in sorted(rows[kind].items(), key=lambda kv: -kv[1])[:args.top]:
      print(f"| {kind} | {shape} | {ms:.1f} |")
  print("\n| op (top by time) | category | output shape | ms/step |\n"
        "|---|---|---|---:|")
  for name, ms in per_op.most_common(args.top):
    print(f"| {name} | {ops[name][0]} | {ops[name][1]} | {ms:.1f} |")
  print(f"\n(trace and HLO dump kept in {work})")


if __name__ == "__main__":
  main()
