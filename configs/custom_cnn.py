"""Custom CNN trained from scratch on AffectNet.

Real run (prepare AffectNet first, see README):

  ./launch.sh train --config=configs/custom_cnn.py \
      --config.data.dir=data/affectnet_arrayrecord --workdir=runs/custom_cnn

`--config=configs/custom_cnn.py:demo` is the CPU-sized variant used by
`./launch.sh demo` and the tests (synthetic data, 48 px, a few minutes on 2
cores).
"""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.model.name = "custom_cnn"
  c.model.kwargs.widths = (64, 128, 256, 512)
  c.model.kwargs.dropout = 0.3
  c.image_size = 112
  c.batch_size = 256
  c.total_steps = 30_000
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 5e-4

  if arg == "demo":
    c.data.dir = "runs/demo/data/arrayrecord"
    c.model.kwargs.widths = (16, 32, 64)
    c.model.kwargs.dropout = 0.1
    c.image_size = 48
    c.batch_size = 64
    c.eval_batch_size = 200
    c.total_steps = 600
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 100
    c.data.num_workers = 1
    c.data.eval_num_workers = 0  # 800 small images: workers cost more than they save.
  elif arg == "tiny":  # Unit/end-to-end tests: seconds, not minutes.
    c.data.dir = ""
    c.model.kwargs.widths = (4, 8)
    c.model.kwargs.dropout = 0.0
    c.image_size = 16
    c.batch_size = 16
    c.eval_batch_size = 24
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.optimizer.warmup_steps = 1
    c.data.num_workers = 0
    c.data.eval_num_workers = 0
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r} for custom_cnn; use 'demo' or 'tiny'.")
  return c
