"""Recipe: VGG16 (ImageNet init) on AffectNet, 8 classes + valence/arousal.

A classic-backbone baseline in the style of the DAN/POSTER family's AffectNet
training: class-balanced sampling instead of loss weights, random erasing,
label smoothing; plus an EMA of the weights and a CCC term for
valence/arousal. No SAM by default (it doubles the cost of the largest
backbone here; `--config.optimizer.sam_rho=0.05` turns it on). Expect below
the EfficientNet recipe (VGG-era AffectNet-8 results are around 58-60%);
targets, sources and ablations: docs/RECIPES.md.

Prepare AffectNet once at 320 px (shared by every recipe):

  ./launch.sh prep --input_dir=/data/AffectNet --output_dir=data/affectnet_320 \
      --image_size=320

Train:

  ./launch.sh train --config=configs/recipes/vgg16.py \
      --config.data.dir=data/affectnet_320 --workdir=runs/recipe_vgg16

Expected time per epoch (287,651 images = 2,247 steps of 128) on one
H100/H200-class GPU in bfloat16: about 4 minutes. An ESTIMATE from the FLOPs
(VGG16 at 224 px: 15.5 GMACs forward, ~3x for training) at about 40% of the
GPU's dense bf16 peak; not measured yet. 30,000 steps = 13.4 epochs.

`--config=configs/recipes/vgg16.py:tiny`: the same knobs at test size (1/8
width, 32 px, from scratch, 4 steps).
"""
from affectjax import config_base as base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.lock()  # A misspelt field below fails here, not silently.
  base.imagenet_finetuning(c)  # Two-phase: head 2k steps, then backbone at 0.1x.
  c.model.name = "vgg16"
  c.model.kwargs = base.model_kwargs(dropout=0.5, head_hidden=256)
  c.model.dtype = "bfloat16"
  c.image_size = 224
  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = 30_000
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.data.dir = "data/affectnet_320"  # The prep command above.
  c.checkpoint.best_metric = "macro_f1"

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3  # Head; backbone 1e-4.
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.sam_rho = 0.0
  c.ema_decay = 0.9995  # ~2k-step horizon, ~1 epoch.

  # Classes drawn evenly (temperature 0), like the ImbalancedDatasetSampler
  # of DAN/POSTER; so no class weights on top (that would correct twice).
  c.data.sampler = "balanced"
  c.data.sampler_temperature = 0.0
  c.loss.class_weighting = "none"
  c.loss.label_smoothing = 0.1
  c.loss.va_mse_weight = 0.5
  c.loss.va_ccc_weight = 1.0

  base.strong_augment(c, crop_scale=(0.7, 1.0), aspect_ratio=(0.9, 1.1),
                      color_jitter=0.2)

  if arg == "tiny":
    c.model.kwargs = base.model_kwargs(c.model.kwargs, width_multiplier=0.125, dropout=0.0, head_hidden=8)
    c.model.dtype = "float32"
    c.ema_decay = 0.5
    c.optimizer.sam_rho = 0.05  # Exercise the SAM path in the tiny run.
    base.small_run(c, "tiny", image_size=32, batch_size=8, eval_batch_size=16,
                   total_steps=4, log_every_steps=2, eval_every_steps=4,
                   learning_rate=1e-4, warmup_steps=1)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of this recipe; use ':tiny' "
                     "or none.")
  c.unlock()
  return c
