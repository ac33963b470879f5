"""Recipe: the custom CNN, from scratch, on AffectNet, 8 classes + valence/arousal.

The small model (about 4.7 M parameters at 112 px) with the full recipe:
weighted cross-entropy, valence/arousal MSE + CCC, SAM, EMA and on-device
augmentation. No published number exists for this network; a from-scratch
CNN of this size on AffectNet-8 is expected in the mid-50s% (see
docs/RECIPES.md for the published targets of the pretrained models and for
the ablations).

Prepare AffectNet once at 320 px (shared by every recipe):

  ./launch.sh prep --input_dir=/data/AffectNet --output_dir=data/affectnet_320 \
      --image_size=320

Train:

  ./launch.sh train --config=configs/recipes/custom_cnn.py \
      --config.data.dir=data/affectnet_320 --workdir=runs/recipe_custom_cnn

Expected time per epoch (287,651 images = 1,123 steps of 256) on one
H100/H200-class GPU: 1-2 minutes, likely bound by the host decoding 320 px
JPEGs rather than by the GPU (2.6 GMACs forward per image, x3 for training,
x2 for SAM). An ESTIMATE, not measured yet; raise `--config.data.num_workers`
to the host's cores. 40,000 steps = 35.6 epochs.

`--config=configs/recipes/custom_cnn.py:tiny`: the same knobs at test size
(widths (4, 8), 16 px, 6 steps).
"""
from affectjax import config_base as base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.lock()  # A misspelt field below fails here, not silently.
  c.model.name = "custom_cnn"
  c.model.init = "scratch"
  c.model.kwargs = base.model_kwargs(widths=(64, 128, 256, 512), dropout=0.3)
  c.image_size = 112  # Random crops of the 320 px faces, resized to 112.
  c.batch_size = 256
  c.eval_batch_size = 256
  c.total_steps = 40_000
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.data.dir = "data/affectnet_320"  # The prep command above.
  c.checkpoint.best_metric = "macro_f1"
  c.data.num_workers = 8

  c.transfer.mode = "full"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 1_000
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.sam_rho = 0.05
  c.ema_decay = 0.999

  c.data.sampler = "shuffle"
  c.loss.class_weighting = "inverse_frequency"
  c.loss.label_smoothing = 0.05
  c.loss.va_mse_weight = 1.0
  c.loss.va_ccc_weight = 0.5

  base.strong_augment(c, crop_scale=(0.7, 1.0), aspect_ratio=(0.9, 1.1),
                      color_jitter=0.3)

  if arg == "tiny":
    c.model.kwargs = base.model_kwargs(c.model.kwargs, widths=(4, 8), dropout=0.0)
    c.ema_decay = 0.5
    base.small_run(c, "tiny", image_size=16, batch_size=16, eval_batch_size=24,
                   total_steps=6, log_every_steps=2, eval_every_steps=3,
                   learning_rate=2e-3, warmup_steps=1)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of this recipe; use ':tiny' "
                     "or none.")
  c.unlock()
  return c
