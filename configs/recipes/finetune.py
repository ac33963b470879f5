"""Recipe: fine-tune a trained run on a small real set (a few thousand faces).

A model trained on FER2013 or FER+ (about 30,000 real faces) is a
face-domain start for a small set of your own (a lab study, a product's
domain), with or without valence/arousal, and the only pretraining there is
where ImageNet files cannot be downloaded. `--config.init_from` names the
trained run (see affectjax/init_from.py): its backbone, BatchNorm statistics
and head's hidden layer are carried exactly, the expression columns of the
classes both runs name (a 7-class FER2013 run -> 8 classes: contempt starts
fresh), and the valence/arousal head where the source learned it; step,
optimizer and data position start anew. Leave `--config.init_from` empty
and the same recipe trains from scratch (the comparison in RECIPES.md).

Architecture: the model and widths must be the source's (a fine-tune stops
at start, exit 2, naming both, if they differ). This recipe builds the
`fer2013.py:cpu` / `ferplus.py:cpu` network (custom CNN, widths 32-256, 48
px); for another source set `--config.model.kwargs` as in its config.json.

Choosing: prepare the small set with a holdout (`--holdout_fraction`); the
holdout picks the checkpoint and `val` is the test set, read once. Length:
`--config.time_budget=14m`: about 3,000 faces end within 15 minutes on 2
CPU cores, compilation and evaluations included (the step count is what
fits; `total_steps` only gives the schedule's shape).

Valence/arousal: a source trained on FER2013 or FER+ never learned them
(no such labels), so its head starts fresh and learns them from the small
set when it has them. The loss is MSE + (1 - CCC), both weights 1: CCC is
what the field reports, so the CCC term trains for the reported number;
the MSE term pins the scale and mean a fresh head starts without, and
steadies the batch CCC's noisy gradient on 64 faces. On the synthetic
set both together matched or beat CCC alone on both CCCs while costing
less expression accuracy (RECIPES.md, "Evidence on the CPU").

  # FER+'s PublicTest faces (FER2013Valid, never in FER2013's Training) as
  # the small set, 20% held out; FER2013Test is val (docs/RECIPES.md):
  ./launch.sh train --config=configs/recipes/finetune.py \
      --config.init_from=runs/fer2013_cpu \
      --config.data.dir=data/ferplus_valid_ft --workdir=runs/finetune_ferplus
  ./launch.sh evaluate --workdir=runs/finetune_ferplus --split=val   # once

Variants: (default) the CPU fine-tune above; `:tiny` the same knobs at test
size (the tests' 16 px, widths (4, 8)).
"""
from affectjax import config_base as base
from configs.recipes import fer2013


def get_config(arg: str | None = None):
  c = fer2013.get_config("tiny" if arg == "tiny" else "cpu")
  c.lock()  # A misspelt field below fails here, not silently.
  c.num_classes = 8  # --config.num_classes=7 for a 7-class set.
  c.data.dir = "data/ferplus_valid_ft"
  c.data.selection_split = "holdout"  # Prepare with --holdout_fraction.
  c.checkpoint.best_metric = "accuracy"  # macro_f1 for a balanced test set.
  c.init_from = ""  # The trained run's workdir; '' = the recipe from scratch.
  c.init_checkpoint = "best"
  c.init_use_ema = True

  # Short: about 40 epochs of 3,000 faces at batch 64, fewer steps than
  # fit in the budget when the machine is faster (the budget then fills
  # what is left: total_steps gives only the schedule's shape).
  c.total_steps = 1_500
  c.eval_every_steps = 300
  c.checkpoint_every_steps = 300
  c.log_every_steps = 50
  c.time_budget = "14m"
  # A lower rate than the source's 2e-3 (its weights are the start, not
  # noise), a short warmup for Adam's moments, and an EMA whose horizon
  # (~200 steps) fits a run of a few thousand steps.
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.05
  c.ema_decay = 0.995
  c.transfer.mode = "full"
  c.loss.va_mse_weight = 1.0
  c.loss.va_ccc_weight = 1.0
  c.loss.valence_weight = 1.0
  c.loss.arousal_weight = 1.0

  if arg == "tiny":
    c.data.dir = ""  # The tests point it at their own prepared data.
    c.data.selection_split = "auto"  # Their data may have no holdout.
    c.time_budget = ""
    c.ema_decay = 0.5
    base.small_run(c, "tiny", image_size=16, batch_size=16, eval_batch_size=24,
                   total_steps=6, log_every_steps=2, eval_every_steps=3,
                   learning_rate=5e-4, warmup_steps=1)
  elif arg not in (None, ""):
    raise ValueError(f"Unknown variant {arg!r} of this recipe; use ':tiny' "
                     "or none.")
  c.unlock()
  return c
