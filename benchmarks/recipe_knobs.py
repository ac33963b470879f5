r"""Each recipe knob doing its job, on the CPU, on the built-in synthetic data.

The synthetic AffectNet is drawn with AffectNet's training imbalance
(`--class_balance=affectnet`: Happy about half, Contempt about 1%) and a
balanced validation split, like the real one. The demo's custom CNN is then
trained once per variant, everything else equal (same data, seed, steps):

  plain CE               no class weights, uniform shuffle, MSE for V/A
  class weights          inverse-frequency class-weighted CE
  balanced sampler       classes drawn evenly (sampler_temperature 0)
  CCC loss               V/A trained with 1 - CCC instead of MSE
  MSE + CCC              both, equal weights

What to look for: class weights and the balanced sampler raise macro-F1 on
the balanced validation split over plain CE; the CCC loss raises valence and
arousal CCC over MSE. Results go to docs/RECIPES.md ("Evidence on the CPU").

  python benchmarks/recipe_knobs.py --workdir=/tmp/recipe_knobs --seeds=0,1

Each variant is a real `python -m affectjax.main` run (subprocess), so this
measures the trainer users run. Medians over seeds are reported.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/recipe_knobs", "Scratch dir.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds (median reported).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 6000, "Synthetic train faces.")
_NUM_VAL = flags.DEFINE_integer("num_val", 800, "Synthetic val faces.")
_STEPS = flags.DEFINE_integer("steps", 600, "Train steps per variant.")
_VARIANTS = flags.DEFINE_list("variants", [], "Subset of variant names.")

VARIANTS = {
    "plain CE": [],
    "class weights": ["--config.loss.class_weighting=inverse_frequency"],
    "balanced sampler": ["--config.data.sampler=balanced",
                         "--config.data.sampler_temperature=0.0"],
    "CCC loss": ["--config.loss.va_mse_weight=0.0",
                 "--config.loss.va_ccc_weight=1.0"],
    "MSE + CCC": ["--config.loss.va_mse_weight=1.0",
                  "--config.loss.va_ccc_weight=1.0"],
}
KEYS = ("accuracy", "macro_f1", "valence_ccc", "arousal_ccc")


def _run(cmd: list[str]) -> None:
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  subprocess.run(cmd, check=True, cwd=REPO, env=env)


def _prepare(root: str) -> str:
  raw, prepared = os.path.join(root, "raw"), os.path.join(root, "prepared")
  if not os.path.exists(os.path.join(raw, "validation.csv")):
    _run([sys.executable, "-m", "data_prep.synthetic", f"--output_dir={raw}",
          f"--num_train={_NUM_TRAIN.value}", f"--num_val={_NUM_VAL.value}",
          "--seed=0", "--class_balance=affectnet"])
  if not os.path.exists(os.path.join(prepared, "manifest.json")):
    _run([sys.executable, "-m", "data_prep.affectnet", f"--input_dir={raw}",
          f"--output_dir={prepared}", "--image_size=56", "--no_progress"])
  return prepared


def _final_val(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["split"] == "val"][-1]


def main(argv):
  del argv
  root = _WORKDIR.value
  prepared = _prepare(root)
  names = _VARIANTS.value or list(VARIANTS)
  results = {}
  for name in names:
    per_seed = []
    for seed in _SEEDS.value:
      wd = os.path.join(root, "runs", name.replace(" ", "_").replace("+", "p"),
                        f"seed{seed}")
      _run([sys.executable, "-m", "affectjax.main",
            "--config=configs/custom_cnn.py:demo", f"--workdir={wd}",
            f"--config.data.dir={prepared}", f"--config.seed={seed}",
            f"--config.total_steps={_STEPS.value}",
            "--config.loss.class_weighting=none",
            "--config.compilation_cache_dir=", *VARIANTS[name]])
      per_seed.append(_final_val(wd))
    results[name] = {k: statistics.median(r[k] for r in per_seed) for k in KEYS}
    print(json.dumps({"variant": name, **results[name]}), flush=True)
  print(f"\nmedian over seeds {','.join(_SEEDS.value)}, {_STEPS.value} steps\n")
  print("| variant | accuracy | macro-F1 | valence CCC | arousal CCC |")
  print("|---|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
          f"{r['valence_ccc']:.3f} | {r['arousal_ccc']:.3f} |")


if __name__ == "__main__":
  app.run(main)
