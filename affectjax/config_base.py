"""The config schema and the defaults shared by every affectjax config.

Model configs (`configs/custom_cnn.py`, `configs/vgg16.py`,
`configs/efficientnet_b3.py`, `configs/recipes/*.py`) start from
`get_base_config()` and override a few fields. Every field can be overridden
from the command line as `--config.<field>=<value>`. The schema lives in the
package (not in `configs/`) so that config files load from any directory
without the repository on `PYTHONPATH`.
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
  # Compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU) | 'float32' |
  # 'bfloat16'. Parameters and BatchNorm statistics always stay float32.
  c.model.dtype = "auto"
  # Fine-tuning a trained run (affectjax/init_from.py): its workdir (local or
  # gs://); '' = off. Backbone weights and BatchNorm statistics come from it,
  # the expression head's columns of the classes both runs name, and the
  # valence/arousal head when the source learned it; step, optimizer state
  # and data position start anew. Read only when the run has no checkpoint
  # of its own (a resume never reads it). Needs model.init='scratch'.
  c.init_from = ""
  c.init_checkpoint = "best"  # 'best' | 'latest' | a step of that run.
  c.init_use_ema = True  # Its EMA weights when it has them.

  # Output of `python -m data_prep.affectnet` (ArrayRecord shards + manifest).
  c.data = ml_collections.ConfigDict()
  c.data.dir = "data/affectnet_arrayrecord"
  # Host threads that read and decode (0 = 2 per core this process may use);
  # training and evaluation share the setting.
  c.data.num_workers = 0
  c.data.prefetch_buffer_size = 4  # Batches decoded ahead (at least one per thread).
  # Decoded-image cache on this host's disk (affectjax/pixel_cache.py):
  # 'auto' (under ~/.cache/affectjax/pixels when it fits with a margin) |
  # 'none' (decode every epoch) | a directory (there, whatever the size).
  c.data.cache = "auto"
  # 'shuffle' (uniform over the split) | 'balanced' (classes drawn by
  # frequency**temperature: 0 = even, 1 = as in the data).
  c.data.sampler = "shuffle"
  c.data.sampler_temperature = 0.0
  # Split that picks the best checkpoint and drives early stopping: 'auto' =
  # 'holdout' when the prepared dir has one, else 'val'.
  c.data.selection_split = "auto"

  c.augment = ml_collections.ConfigDict()
  c.augment.flip = True
  c.augment.crop_scale = (0.8, 1.0)  # Area fraction of the random crop.
  c.augment.aspect_ratio = (0.9, 1.1)
  # Off by default (the recipes turn them on); all run on the device.
  c.augment.color_jitter = 0.0  # Max relative brightness/contrast/saturation change.
  c.augment.erasing_prob = 0.0  # Random erasing probability per image.
  c.augment.rotate_degrees = 0.0  # Max |rotation| of the small affine.
  c.augment.translate = 0.0  # Max shift, as a fraction of the side.

  c.batch_size = 256  # Global, over all devices of all hosts.
  c.eval_batch_size = 256
  # JAX devices the host CPU is split into (data-parallel): 1 = one device
  # (default: the split no longer pays, and EfficientNet-B3 ran 2-3x slower
  # split, affectjax/cpu_devices.py); 0 = one per core while each gets 16+
  # images of both batches; N = exactly N. Only where the CPU is the backend.
  c.cpu_devices = 1
  c.total_steps = 30_000
  # Wall-clock budget for the train command, from process start: '30m',
  # '1h30m', '90s' or seconds ('' = off). The run measures its step speed
  # and trains as many steps as fit (evaluations and saves included);
  # total_steps then only sets the shape: the evaluation/checkpoint
  # cadences and transfer.unfreeze_step scale with the planned length
  # (affectjax/time_budget.py; the plan is kept in W/time_budget.json).
  c.time_budget = ""
  c.log_every_steps = 100
  c.eval_every_steps = 2_000
  # Evaluate val at each evaluation while training (besides the selection
  # split). False: training reads only the selection split (holdout), and
  # val is read once, after, by `evaluate --split=val` (a test split the
  # protocol reads once, as FER2013's PrivateTest); the run's result, summary,
  # report and confusion matrix are then the selection split's. val is
  # evaluated anyway when it is the selection split (no holdout).
  c.eval_val_during_training = True
  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 3
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.best_metric = "macro_f1"  # Also kept besides the latest N.
  c.checkpoint.best_mode = "max"  # 'max' | 'min'
  c.early_stopping_patience = 0  # Evaluations without improvement; 0 = off.
  c.ema_decay = 0.0  # EMA of the weights for evaluation; 0 = off.
  # JAX's persistent compilation cache ('' = off).
  c.compilation_cache_dir = "~/.cache/affectjax/jax_cache"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # 'adamw' | 'sgd'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.momentum = 0.9  # sgd only.
  c.optimizer.schedule = "cosine"  # 'cosine' | 'constant'
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0  # <= 0 disables clipping.
  c.optimizer.sam_rho = 0.0  # SAM neighbourhood radius; 0 = plain optimizer.

  c.transfer = ml_collections.ConfigDict()
  c.transfer.mode = "full"  # 'full' | 'frozen' | 'two_phase'
  c.transfer.unfreeze_step = 0  # two_phase: backbone trains from this step.
  c.transfer.backbone_lr_multiplier = 1.0

  c.loss = ml_collections.ConfigDict()
  c.loss.valence_weight = 1.0
  c.loss.arousal_weight = 1.0
  c.loss.label_smoothing = 0.0
  c.loss.class_weighting = "none"  # 'none' | 'inverse_frequency'
  # Valence/arousal: va_mse_weight * MSE + va_ccc_weight * (1 - CCC), each
  # then scaled by valence_weight / arousal_weight.
  c.loss.va_mse_weight = 1.0
  c.loss.va_ccc_weight = 0.0
  return c


def imagenet_finetuning(c: ml_collections.ConfigDict) -> None:
  """Shared recipe for fine-tuning an ImageNet backbone on AffectNet.

  Two-phase transfer: the head alone for 2,000 steps, then the backbone too
  at 0.1x the learning rate. Inverse-frequency class weights, because
  AffectNet's training split is about half Happy.
  """
  c.model.init = "imagenet"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3  # Head; the backbone gets 1e-4.
  c.optimizer.schedule = "cosine"
  c.optimizer.grad_clip_norm = 1.0
  c.transfer.mode = "two_phase"
  c.transfer.unfreeze_step = 2_000
  c.transfer.backbone_lr_multiplier = 0.1
  c.augment.flip = True
  c.augment.crop_scale = (0.75, 1.0)
  c.augment.aspect_ratio = (0.9, 1.1)
  c.loss.class_weighting = "inverse_frequency"


def model_kwargs(*base_kwargs, **kwargs) -> ml_collections.ConfigDict:
  """``config.model.kwargs`` as a whole (under a locked config, the one
  open-ended field is set whole): ``base_kwargs`` updated with ``kwargs``."""
  return ml_collections.ConfigDict(dict(*base_kwargs, **kwargs))


def strong_augment(c: ml_collections.ConfigDict, *, crop_scale: tuple,
                   aspect_ratio: tuple, color_jitter: float) -> None:
  """The recipes' augmentation: the papers' flip, crop, colour jitter, random
  erasing (p 0.25) and small affine (10 degrees, 5% shift), all on the device."""
  c.augment.flip = True
  c.augment.crop_scale = tuple(crop_scale)
  c.augment.aspect_ratio = tuple(aspect_ratio)
  c.augment.color_jitter = float(color_jitter)
  c.augment.erasing_prob = 0.25
  c.augment.rotate_degrees = 10.0
  c.augment.translate = 0.05


def small_run(c: ml_collections.ConfigDict, variant: str, *, image_size: int,
              batch_size: int, eval_batch_size: int, total_steps: int,
              log_every_steps: int, eval_every_steps: int, learning_rate: float,
              warmup_steps: int) -> None:
  """Shrinks a config for the CPU: 'demo' (synthetic data, minutes) or 'tiny' (tests).

  Both train from scratch with full fine-tuning (one compiled train step;
  the transfer modes have their own tests).
  """
  c.model.init = "scratch"
  c.transfer.mode = "full"
  c.transfer.backbone_lr_multiplier = 1.0
  c.image_size = image_size
  c.batch_size = batch_size
  c.eval_batch_size = eval_batch_size
  c.total_steps = total_steps
  c.log_every_steps = log_every_steps
  c.eval_every_steps = eval_every_steps
  c.checkpoint_every_steps = eval_every_steps
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = warmup_steps
  if variant == "demo":
    c.data.dir = "runs/demo/data/arrayrecord"
  elif variant == "tiny":
    c.data.dir = ""  # The tests point it at their own prepared data.
    c.data.num_workers = 2
  else:
    raise ValueError(f"Unknown config variant {variant!r}; use 'demo' or 'tiny'.")
