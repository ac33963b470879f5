"""VGG16 fine-tuned from ImageNet on AffectNet (224 px, Keras 'caffe' preprocessing).

Real run (prepare AffectNet first, see README; the ImageNet file is downloaded
to config.model.weights_dir, or put it there by hand when offline):

  ./launch.sh train --config=configs/vgg16.py \
      --config.data.dir=data/affectnet_arrayrecord --workdir=runs/vgg16

Transfer learning is two-phase: the head alone for the first 2,000 steps
(backbone frozen), then everything, the backbone at 0.1x the learning rate
with its own warmup. Alternatives:
`--config.transfer.mode=frozen` (the head alone, as the original Keras
project did) or `=full`. Mixed precision: `--config.model.dtype=bfloat16`.

`--config=configs/vgg16.py:tiny` is the 32 px, 1/8-width, from-scratch,
few-step variant the tests use; `:demo` a CPU-sized (1/4-width) run on
synthetic data.
"""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.model.name = "vgg16"
  c.model.init = "imagenet"
  c.model.kwargs.dropout = 0.5
  c.model.kwargs.head_hidden = 256
  c.image_size = 224  # keras.applications.VGG16 default size.
  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = 30_000  # ~13 epochs of AffectNet's ~287k training images.
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3  # Head; the backbone gets 1e-4.
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0
  c.transfer.mode = "two_phase"
  c.transfer.unfreeze_step = 2_000
  c.transfer.backbone_lr_multiplier = 0.1
  c.augment.flip = True
  c.augment.crop_scale = (0.75, 1.0)
  c.augment.aspect_ratio = (0.9, 1.1)
  c.loss.class_weighting = "inverse_frequency"  # AffectNet is ~50% Happy.

  if arg == "demo":  # CPU, synthetic data, minutes; no ImageNet file needed.
    c.data.dir = "runs/demo/data/arrayrecord"
    c.model.init = "scratch"
    c.model.kwargs.width_multiplier = 0.25  # VGG16 layout, 1/4 of the filters.
    c.model.kwargs.dropout = 0.1
    c.model.kwargs.head_hidden = 64
    c.image_size = 32  # VGG16's five 2x2 pools need >= 32 px.
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = 200
    c.log_every_steps = 20
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 20
    c.transfer.mode = "full"
    c.transfer.backbone_lr_multiplier = 1.0
    c.data.num_workers = 1
    c.data.eval_num_workers = 0  # Small synthetic val split: workers cost more than they save.
  elif arg == "tiny":  # Unit/end-to-end tests: seconds, not minutes.
    c.data.dir = ""
    c.model.init = "scratch"
    c.model.kwargs.width_multiplier = 0.125  # VGG16 layout, 1/8 of the filters.
    c.model.kwargs.dropout = 0.0
    c.model.kwargs.head_hidden = 8
    c.image_size = 32
    c.batch_size = 8
    c.eval_batch_size = 16
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 4
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 1
    # One compiled train step (two_phase compiles two); the transfer modes
    # have their own tests (tests/test_optim.py).
    c.transfer.mode = "full"
    c.transfer.backbone_lr_multiplier = 1.0
    c.data.num_workers = 0
    c.data.eval_num_workers = 0
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r} for vgg16; use 'demo' or 'tiny'.")
  return c
