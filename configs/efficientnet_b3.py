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
from affectjax import config_base as base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  base.imagenet_finetuning(c)
  c.model.name = "efficientnet_b3"
  c.model.kwargs.dropout = 0.3  # Keras' EfficientNetB3 top dropout.
  c.model.kwargs.head_hidden = 256
  c.model.kwargs.drop_connect_rate = 0.2  # Keras' default stochastic depth.
  c.image_size = 300  # keras.applications.EfficientNetB3 default size.
  c.batch_size = 64
  c.eval_batch_size = 128
  c.total_steps = 60_000  # ~13 epochs of AffectNet's ~287k training images.
  c.eval_every_steps = 4_000
  c.checkpoint_every_steps = 4_000
  c.optimizer.weight_decay = 1e-5
  c.optimizer.warmup_steps = 1_000

  if arg:
    # The same code path, shrunken: B3's block structure at 1/4 width.
    c.model.kwargs.width_coefficient = 0.25
  if arg == "demo":  # CPU, synthetic data, minutes; no ImageNet file needed.
    c.model.kwargs.depth_coefficient = 0.4  # ~1/3 of B3's depth.
    c.model.kwargs.dropout = 0.1
    c.model.kwargs.head_hidden = 64
    base.small_run(c, "demo", image_size=64, batch_size=32, eval_batch_size=64,
                   total_steps=300, log_every_steps=25, eval_every_steps=150,
                   learning_rate=2e-3, warmup_steps=30)
  elif arg:  # 'tiny': the tests' variant, seconds not minutes.
    # One block per stage: fewer XLA compiles and checkpoint leaves. (Residual
    # blocks and drop-connect are tested in tests/test_models.py.)
    c.model.kwargs.depth_coefficient = 0.25
    c.model.kwargs.dropout = 0.0
    c.model.kwargs.head_hidden = 8
    base.small_run(c, arg, image_size=32, batch_size=8, eval_batch_size=16,
                   total_steps=4, log_every_steps=2, eval_every_steps=4,
                   learning_rate=1e-3, warmup_steps=1)
  return c
