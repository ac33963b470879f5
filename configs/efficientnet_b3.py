"""EfficientNet-B3 fine-tuned from ImageNet on AffectNet (300 px, in-model normalization).

Real run (prepare AffectNet first, see README; the ImageNet file is downloaded
to config.model.weights_dir, or put it there by hand when offline):

  ./launch.sh train --config=configs/efficientnet_b3.py \
      --config.data.dir=data/affectnet_arrayrecord --workdir=runs/efficientnet_b3

Transfer learning is two-phase: the head alone for the first 2,000 steps
(backbone frozen, BatchNorm in inference mode), then everything, the backbone
at 0.1x the learning rate with its own warmup and stochastic depth 0.2.
Alternatives: `--config.transfer.mode=frozen` (the head alone, as the original
Keras project did) or `=full`. Mixed precision: `--config.model.dtype=bfloat16`.

`--config=configs/efficientnet_b3.py:tiny` is the shrunken (width 0.25,
depth 0.25), 32 px, from-scratch, few-step variant the tests use; `:demo`
(width 0.25, depth 0.4) a CPU-sized run on synthetic data.
"""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.model.name = "efficientnet_b3"
  c.model.init = "imagenet"
  c.model.kwargs.dropout = 0.3  # Keras' EfficientNetB3 top dropout.
  c.model.kwargs.head_hidden = 256
  c.model.kwargs.drop_connect_rate = 0.2  # Keras' default stochastic depth.
  c.image_size = 300  # keras.applications.EfficientNetB3 default size.
  c.batch_size = 64
  c.eval_batch_size = 128
  c.total_steps = 60_000  # ~13 epochs of AffectNet's ~287k training images.
  c.eval_every_steps = 4_000
  c.checkpoint_every_steps = 4_000
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3  # Head; the backbone gets 1e-4.
  c.optimizer.weight_decay = 1e-5
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 1_000
  c.optimizer.grad_clip_norm = 1.0
  c.transfer.mode = "two_phase"
  c.transfer.unfreeze_step = 2_000
  c.transfer.backbone_lr_multiplier = 0.1
  c.augment.flip = True
  c.augment.crop_scale = (0.75, 1.0)
  c.augment.aspect_ratio = (0.9, 1.1)
  c.loss.class_weighting = "inverse_frequency"  # AffectNet is ~50% Happy.

  if arg in ("demo", "tiny"):
    # The same code path, shrunken: B3's block structure at 1/4 width, ~1/3 depth.
    c.model.init = "scratch"
    c.model.kwargs.width_coefficient = 0.25
    c.model.kwargs.depth_coefficient = 0.4
  if arg == "demo":  # CPU, synthetic data, minutes; no ImageNet file needed.
    c.data.dir = "runs/demo/data/arrayrecord"
    c.model.kwargs.dropout = 0.1
    c.model.kwargs.head_hidden = 64
    c.image_size = 64
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 150
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 30
    c.transfer.mode = "full"
    c.transfer.backbone_lr_multiplier = 1.0
    c.data.num_workers = 1
    c.data.eval_num_workers = 0  # Small synthetic val split: workers cost more than they save.
  elif arg == "tiny":  # Unit/end-to-end tests: seconds, not minutes.
    c.data.dir = ""
    # One block per stage: fewer XLA compiles and checkpoint leaves. (Residual
    # blocks and drop-connect are tested in tests/test_models.py.)
    c.model.kwargs.depth_coefficient = 0.25
    c.model.kwargs.dropout = 0.0
    c.model.kwargs.head_hidden = 8
    c.model.kwargs.drop_connect_rate = 0.2
    c.image_size = 32
    c.batch_size = 8
    c.eval_batch_size = 16
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 4
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
    # One compiled train step (two_phase compiles two); the transfer modes
    # have their own tests (tests/test_optim.py).
    c.transfer.mode = "full"
    c.transfer.backbone_lr_multiplier = 1.0
    c.data.num_workers = 0
    c.data.eval_num_workers = 0
  elif arg and arg != "demo":
    raise ValueError(
        f"Unknown config variant {arg!r} for efficientnet_b3; use 'demo' or 'tiny'.")
  return c
