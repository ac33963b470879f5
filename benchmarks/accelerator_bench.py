r"""Accelerator throughput: images/s, MFU and input-wait share of the real train step.

For each (model, image size, compute dtype) it times `affectjax.train`'s own
jitted step (`train.make_steps`, device augmentation included) two ways:

  synthetic  one device-resident uint8 global batch reused every step: the
             step alone, what the accelerator can do;
  input      the real host path (`input_pipeline.train_dataset` ->
             `DevicePrefetch`) over a prepared directory: what the trainer
             gets, with the share of wall time spent waiting for input.

Both rows run the same compiled step on batches of the same shape: the
synthetic batch has the side the host path delivers for the data dir
(`batch_loaders.host_image_size`), so the on-device crop and resize do the
same work in both.

MFU = (FLOPs per step per device, from XLA's cost analysis of the compiled
sharded step, which is already one device's share) / (step time x the
device's peak dense FLOP/s for the dtype).
Peaks are the vendors' dense (no sparsity) numbers; an unknown device prints
FLOP/s without MFU (pass --peak_tflops to set one).

  # On a GPU/TPU host (data prepared at 320 px, `./launch.sh prep ...`):
  python benchmarks/accelerator_bench.py --data_dir=data/affectnet_arrayrecord
  # Quick check of the script itself on a CPU (tiny widths, few steps):
  JAX_PLATFORMS=cpu python benchmarks/accelerator_bench.py --smoke \
      --data_dir=runs/demo/data/arrayrecord
  # Train-step GFLOPs per image of the shipped configs (any backend):
  JAX_PLATFORMS=cpu python benchmarks/accelerator_bench.py --flops_only

Prints one JSON line per measurement and a Markdown table at the end
(docs/BENCHMARKS.md, "Accelerator").
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared ArrayRecord dir "
                                "for the input-path runs ('' = skip them).")
_MODELS = flags.DEFINE_list(
    "models", ["vgg16:224", "efficientnet_b3:300", "custom_cnn:112"],
    "name:image_size pairs.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0 = the "
                              "model config's default).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats (median reported).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s per device "
                           "for the dtype (0 = from the table).")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU check: tiny variants, 3 steps.")
_FLOPS_ONLY = flags.DEFINE_bool(
    "flops_only", False, "Only print each model's train-step GFLOPs per "
    "image from XLA's cost analysis (any backend; docs/BENCHMARKS.md's "
    "cores-per-GPU table).")

# Dense peak TFLOP/s per device: (bfloat16, float32). float32 on NVIDIA is
# the non-tensor-core rate (XLA's default precision uses TF32 tensor cores
# for f32 matmuls/convolutions on Ampere+, so f32 MFU can exceed 100% of it;
# the TF32 column is what such runs approach).
_PEAKS = {
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5),
    "L4": (121.0, 30.3), "V100": (125.0, 15.7),
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0),
}


def _peak_tflops(dtype: str) -> float | None:
  if _PEAK.value:
    return _PEAK.value
  kind = jax.devices()[0].device_kind
  for name, (bf16, f32) in _PEAKS.items():
    if name.lower() in kind.lower():
      return bf16 if dtype == "bfloat16" else f32
  return None


def _config(name: str, size: int, dtype: str):
  from configs import custom_cnn, efficientnet_b3, vgg16  # pylint: disable=g-import-not-at-top
  module = {"vgg16": vgg16, "efficientnet_b3": efficientnet_b3,
            "custom_cnn": custom_cnn}[name]
  c = module.get_config("tiny" if _SMOKE.value else None)
  c.model.init = "scratch"  # Speed does not depend on the weights' values.
  c.model.dtype = dtype
  c.image_size = 32 if _SMOKE.value and name != "custom_cnn" else (
      16 if _SMOKE.value else size)
  if _BATCH.value:
    c.batch_size = _BATCH.value
  c.batch_size -= c.batch_size % jax.device_count()
  c.total_steps = 10 ** 9
  c.transfer.mode = "full"
  if _DATA_DIR.value:
    c.data.dir = _DATA_DIR.value
  return c


def _time_steps(train_fn, state, next_batch, steps):
  """Median seconds/step over repeats; the state is threaded through."""
  times = []
  for _ in range(_REPEATS.value):
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
      state, m = train_fn(state, next_batch(), train_backbone=True)
    jax.block_until_ready((state, m))
    times.append((time.perf_counter() - t) / steps)
  return statistics.median(times), state


def _input_size(config) -> int:
  """Side of the uint8 batches the real host path delivers for `config`
  (`host_image_size`: the stored size, or its DCT-scaled size), so the
  synthetic batch makes the step do the same work (the on-device resize
  runs from the same size); `image_size` without a data dir."""
  from affectjax import batch_loaders, data  # pylint: disable=g-import-not-at-top
  if not _DATA_DIR.value:
    return int(config.image_size)
  return batch_loaders.host_image_size(config, data.read_manifest(
      _DATA_DIR.value))


def _step_flops(train_fn, state, batch) -> float:
  """FLOPs of one step on one device, from XLA's cost analysis of the
  compiled program (for a program sharded over N devices, the analysis is
  already of one device's share: it is not divided by N again)."""
  cost = train_fn.lower(state, batch, train_backbone=True).compile(
  ).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def _host_batch(b: int, s: int) -> dict:
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "expression": rng.integers(0, 8, (b,)).astype(np.int32),
          "valence": rng.uniform(-1, 1, (b,)).astype(np.float32),
          "arousal": rng.uniform(-1, 1, (b,)).astype(np.float32)}


def bench_one(name: str, size: int, dtype: str) -> list[dict]:
  from affectjax import device_prefetch, input_pipeline, sharding, train, train_state  # pylint: disable=g-import-not-at-top
  config = _config(name, size, dtype)
  mesh = sharding.make_mesh()
  graphdef, state, tx = train_state.init_state(config, mesh)
  train_fn, _ = train.make_steps(graphdef, tx, config, mesh)
  b, s = config.batch_size, config.image_size
  batch = sharding.shard_batch(_host_batch(b, _input_size(config)), mesh)
  flops = _step_flops(train_fn, state, batch)  # Per device.
  steps = 3 if _SMOKE.value else _STEPS.value
  peak = _peak_tflops(dtype)
  common = {"model": name, "image_size": s,
            "input_size": int(batch["image"].shape[1]), "dtype": dtype,
            "batch_size": b, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "gflops_per_image": flops * jax.device_count() / b / 1e9}

  def row(kind, sec, wait_share):
    tflops = flops / sec / 1e12
    return {**common, "input": kind, "images_per_sec": b / sec,
            "step_ms": 1e3 * sec, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None,
            "input_wait_share": wait_share}

  state, _ = train_fn(state, batch, train_backbone=True)  # Warm-up.
  sec, state = _time_steps(train_fn, state, lambda: batch, steps)
  rows = [row("synthetic (device-resident)", sec, 0.0)]
  if _DATA_DIR.value:
    local = sharding.local_batch_size(b, mesh, flag="batch_size")
    it = device_prefetch.DevicePrefetch(iter(input_pipeline.train_dataset(
        config, local_batch_size=local, process_index=jax.process_index(),
        process_count=jax.process_count())), mesh)
    try:
      state, _ = train_fn(state, next(it), train_backbone=True)  # Warm-up.
      wait0, t0 = it.wait_seconds, time.perf_counter()
      sec_in, state = _time_steps(train_fn, state, lambda: next(it), steps)
      wall = time.perf_counter() - t0
      rows.append(row("real host path", sec_in,
                      (it.wait_seconds - wait0) / wall))
    finally:
      it.close()
  return rows


def flops_per_image(name: str, size: int, batch: int = 8) -> float:
  """Train-step GFLOPs per image of a shipped config at `size`, from XLA's
  cost analysis of the lowered step on abstract inputs (nothing is
  initialized, compiled or timed, so it runs on any backend, a CPU too)."""
  from affectjax import sharding, train, train_state  # pylint: disable=g-import-not-at-top
  config = _config(name, size, "bfloat16")
  config.batch_size = batch
  mesh = sharding.make_mesh(jax.devices()[:1])
  graphdef, state, tx = train_state.abstract_state(config, mesh)
  train_fn, _ = train.make_steps(graphdef, tx, config, mesh)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec),
      _host_batch(batch, size))
  cost = train_fn.lower(state, batch_spec, train_backbone=True).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch / 1e9


def _table(rows: list[dict]) -> str:
  out = ["| model | px (input) | dtype | batch | input | images/s | step ms | "
         "GFLOP/img | TFLOP/s/device | MFU | input wait |", "|" + "---|" * 11]
  for r in rows:
    mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
    out.append(
        f"| {r['model']} | {r['image_size']} ({r['input_size']}) | "
        f"{r['dtype']} | {r['batch_size']} | {r['input']} | "
        f"{r['images_per_sec']:.0f} | {r['step_ms']:.1f} | "
        f"{r['gflops_per_image']:.1f} | {r['tflops_per_device']:.1f} | {mfu} | "
        f"{100 * r['input_wait_share']:.0f}% |")
  return "\n".join(out)


def main(argv):
  del argv
  if _FLOPS_ONLY.value:
    for spec in _MODELS.value:
      name, size = spec.split(":")
      print(json.dumps({"model": name, "image_size": int(size),
                        "train_gflops_per_image": flops_per_image(
                            name, int(size))}), flush=True)
    return
  rows = []
  for spec in _MODELS.value:
    name, size = spec.split(":")
    for dtype in _DTYPES.value:
      for row in bench_one(name, int(size), dtype):
        print(json.dumps(row), flush=True)
        rows.append(row)
  print(f"\n{jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}\n")
  print(_table(rows))


if __name__ == "__main__":
  app.run(main)
