"""Defaults shared by every affectjax config.

Model configs (`configs/custom_cnn.py`, `configs/vgg16.py`,
`configs/efficientnet_b3.py`) start from `get_base_config()` and override a few
fields. Every field can be overridden from the command line as
`--config.<field>=<value>`.
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the full config schema with defaults for a real AffectNet run."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = 8
  c.image_size = 112  # Training/eval resolution in pixels (square).

  c.model = ml_collections.ConfigDict()
  c.model.name = "custom_cnn"
  c.model.kwargs = ml_collections.ConfigDict()  # Passed to models.create.
  c.model.init = "scratch"  # 'scratch' | 'imagenet'
  c.model.weights_dir = "~/.cache/affectjax/weights"
  c.model.dtype = "float32"  # Compute dtype: 'float32' | 'bfloat16'.

  # Output of `python -m data_prep.affectnet` (ArrayRecord shards + manifest).
  c.data = ml_collections.ConfigDict()
  c.data.dir = "data/affectnet_arrayrecord"
  c.data.num_workers = 2  # Grain worker processes (0 = in-process).
  c.data.eval_num_workers = 2  # Same, for evaluation passes.
  c.data.prefetch_buffer_size = 4  # Batches buffered per worker.

  c.augment = ml_collections.ConfigDict()
  c.augment.flip = True
  c.augment.crop_scale = (0.8, 1.0)  # Area fraction of the random crop.
  c.augment.aspect_ratio = (0.9, 1.1)

  c.batch_size = 256  # Global, over all devices of all hosts.
  c.eval_batch_size = 256
  c.total_steps = 30_000
  c.log_every_steps = 100
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 3

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # 'adamw' | 'sgd'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.momentum = 0.9  # sgd only.
  c.optimizer.schedule = "cosine"  # 'cosine' | 'constant'
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0  # <= 0 disables clipping.

  c.transfer = ml_collections.ConfigDict()
  c.transfer.mode = "full"  # 'full' | 'frozen' | 'two_phase'
  c.transfer.unfreeze_step = 0  # two_phase: backbone trains from this step.
  c.transfer.backbone_lr_multiplier = 1.0

  c.loss = ml_collections.ConfigDict()
  c.loss.valence_weight = 1.0
  c.loss.arousal_weight = 1.0
  c.loss.label_smoothing = 0.0
  c.loss.class_weighting = "none"  # 'none' | 'inverse_frequency'
  return c
