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
from affectjax import config_base as base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  base.imagenet_finetuning(c)
  c.model.name = "vgg16"
  c.model.kwargs.dropout = 0.5
  c.model.kwargs.head_hidden = 256
  c.image_size = 224  # keras.applications.VGG16 default size.
  c.batch_size = 128
  c.eval_batch_size = 256
  c.total_steps = 30_000  # ~13 epochs of AffectNet's ~287k training images.
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500

  if arg == "demo":  # CPU, synthetic data, minutes; no ImageNet file needed.
    c.model.kwargs.width_multiplier = 0.25  # VGG16 layout, 1/4 of the filters.
    c.model.kwargs.dropout = 0.1
    c.model.kwargs.head_hidden = 64
    # VGG16's five 2x2 pools need >= 32 px.
    base.small_run(c, "demo", image_size=32, batch_size=32, eval_batch_size=64,
                   total_steps=200, log_every_steps=20, eval_every_steps=100,
                   learning_rate=1e-4, warmup_steps=20)
  elif arg:  # 'tiny': the tests' variant, seconds not minutes.
    c.model.kwargs.width_multiplier = 0.125  # VGG16 layout, 1/8 of the filters.
    c.model.kwargs.dropout = 0.0
    c.model.kwargs.head_hidden = 8
    base.small_run(c, arg, image_size=32, batch_size=8, eval_batch_size=16,
                   total_steps=4, log_every_steps=2, eval_every_steps=4,
                   learning_rate=1e-4, warmup_steps=1)
  return c
