"""Recipe: EfficientNet-B3 (ImageNet init) on AffectNet, 8 classes + valence/arousal.

Aims at HSEmotion's EfficientNet-B2 (63.0% 8-class accuracy on AffectNet's
validation set) with the knobs that paper family uses: SAM around Adam(W),
weighted cross-entropy, a CCC term for valence/arousal, plus an EMA of the
weights and stronger on-device augmentation. Targets and sources, and how to
ablate each knob: docs/RECIPES.md. Values are starting points, not a tuned
result.

Prepare AffectNet once at 320 px (every recipe trains from the same data):

  ./launch.sh prep --input_dir=/data/AffectNet --output_dir=data/affectnet_320 \
      --image_size=320

Train (one GPU; mixed precision):

  ./launch.sh train --config=configs/recipes/efficientnet_b3.py \
      --config.data.dir=data/affectnet_320 --workdir=runs/recipe_b3

Expected time per epoch (287,651 training images = 4,494 steps of 64) on one
H100/H200-class GPU in bfloat16: about 10 minutes with SAM (two forward and
backward passes per step), 5 without. An ESTIMATE from the FLOPs (B3 at
300 px: 1.8 GMACs forward) and typical EfficientNet training throughput; not
measured yet. 60,000 steps = 13.4 epochs.

`--config=configs/recipes/efficientnet_b3.py:tiny`: the same knobs but SAM at test
size (B3 at 1/4 width and depth, 32 px, from scratch, 4 steps).
"""
from affectjax import config_base as base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.lock()  # A misspelt field below fails here, not silently.
  base.imagenet_finetuning(c)  # Two-phase: head 2k steps, then backbone at 0.1x.
  c.model.name = "efficientnet_b3"
  c.model.kwargs = base.model_kwargs(dropout=0.3, head_hidden=256, drop_connect_rate=0.2)
  c.model.dtype = "bfloat16"  # f32 params and BatchNorm statistics.
  c.image_size = 300  # Random crops of the 320 px faces, resized to 300.
  c.batch_size = 64
  c.eval_batch_size = 128
  c.total_steps = 60_000
  c.eval_every_steps = 4_000
  c.checkpoint_every_steps = 4_000
  c.data.dir = "data/affectnet_320"  # The prep command above.
  c.checkpoint.best_metric = "macro_f1"  # AffectNet's val split is balanced.

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3  # Head; backbone 1e-4.
  c.optimizer.weight_decay = 1e-5
  c.optimizer.warmup_steps = 1_000
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.sam_rho = 0.05  # SAM's default radius (Foret et al.).
  c.ema_decay = 0.9998  # ~5k-step horizon, ~1 epoch.

  c.data.sampler = "shuffle"  # Imbalance handled by the loss weights.
  c.loss.class_weighting = "inverse_frequency"
  c.loss.label_smoothing = 0.1
  c.loss.va_mse_weight = 0.5
  c.loss.va_ccc_weight = 1.0

  base.strong_augment(c, crop_scale=(0.6, 1.0), aspect_ratio=(0.85, 1.15),
                      color_jitter=0.3)

  if arg == "tiny":
    c.model.kwargs = base.model_kwargs(c.model.kwargs, width_coefficient=0.25, depth_coefficient=0.25, dropout=0.0, head_hidden=8)
    c.model.dtype = "float32"
    c.ema_decay = 0.5
    # SAM's second pass doubles B3's compile; the custom CNN and VGG16 tiny
    # runs exercise it.
    c.optimizer.sam_rho = 0.0
    base.small_run(c, "tiny", image_size=32, batch_size=8, eval_batch_size=16,
                   total_steps=4, log_every_steps=2, eval_every_steps=4,
                   learning_rate=1e-3, warmup_steps=1)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of this recipe; use ':tiny' "
                     "or none.")
  c.unlock()
  return c
