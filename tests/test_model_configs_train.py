"""The model configs build Keras' architectures; the recipes train end to end.

Recipes' :tiny variants (VGG16, EfficientNet-B3 and the custom CNN at test
size, with every recipe knob on but B3's SAM): synthetic AffectNet -> ArrayRecords ->
`train.train_and_evaluate` for a few steps; then the final checkpoint is
checked against the initial state (head and backbone both moved, the EMA
apart from both), losses are finite, and the final evaluation covers every
validation example. The full-size configs differ from :tiny only in sizes,
steps and transfer mode (tested in test_optim.py).
"""
import json
import os

import jax
import numpy as np
import pytest

from affectjax import checkpoint as ckpt_lib
from affectjax import sharding
from affectjax import train
from affectjax import train_state
from configs import efficientnet_b3
from configs import vgg16

NUM_VAL = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("model_configs_data")
  synthetic.generate(str(root / "raw"), num_train=48, num_val=NUM_VAL, seed=1,
                     image_size=48)
  affectnet.prepare(str(root / "raw"), str(root / "prepared"), image_size=32,
                    num_workers=1, progress=False)
  return str(root / "prepared")


def _restore_final(config, workdir, like):
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1)
  try:
    return jax.device_get(c.restore(c.latest_step(), ckpt_lib.abstract_like(like)))
  finally:
    c.close()


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("config_module,name,size", [
    (vgg16, "vgg16", 224), (efficientnet_b3, "efficientnet_b3", 300)])
def test_full_configs_build_the_keras_architecture(config_module, name, size):
  """The real configs: Keras' default size, ImageNet init, kwargs the model accepts."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from affectjax import models  # pylint: disable=g-import-not-at-top
  from affectjax.models import imagenet  # pylint: disable=g-import-not-at-top
  config = config_module.get_config()
  assert (config.model.name, config.image_size, config.model.init) == (name, size, "imagenet")
  assert config.model.name in imagenet.WEIGHT_FILES
  model = nnx.eval_shape(lambda: models.create(
      config.model.name, rngs=nnx.Rngs(0), num_classes=config.num_classes,
      dtype=train_state.compute_dtype(config), **dict(config.model.kwargs)))
  n_backbone = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(
      nnx.state(model.backbone, nnx.Param)))
  # keras.applications' trainable parameter counts (include_top=False).
  assert n_backbone == {"vgg16": 14_714_688, "efficientnet_b3": 10_696_232}[name]
  for arg in ("demo", "tiny"):
    assert config_module.get_config(arg).model.init == "scratch"
  with pytest.raises(ValueError, match="Unknown config variant"):
    config_module.get_config("huge")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["custom_cnn", "vgg16", "efficientnet_b3"])
def test_recipe_tiny_variants_train_end_to_end(recipe, data_dir, tmp_path):
  """configs/recipes/*.py:tiny through the real trainer: each model family
  (the shipped model configs' architectures) with SAM (not B3's: it doubles
  the compile), EMA, the CCC loss
  mix, every device augmentation and (VGG16) the balanced sampler."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.recipes.{recipe}").get_config("tiny")
  config.data.dir = data_dir
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == config.total_steps
  assert result["num_examples"] == NUM_VAL and np.isfinite(result["loss"])
  assert config.ema_decay > 0 and config.loss.va_ccc_weight > 0
  with open(tmp_path / "metrics.jsonl") as f:
    train_lines = [json.loads(l) for l in f if '"train"' in l]
  assert train_lines and all(np.isfinite(l["loss"]) for l in train_lines)
  for l in train_lines:  # What a user reads to find the bottleneck.
    assert 0.0 <= l["input_wait_share"] <= 1.0
    assert 0.0 <= l["accuracy"] <= 1.0 and l["learning_rate"] > 0
  _, initial, _ = train_state.init_state(config, sharding.make_mesh())
  final = _restore_final(config, str(tmp_path), jax.device_get(initial))
  initial = jax.device_get(initial)
  assert int(final["step"]) == config.total_steps
  for group in ("head", "backbone"):  # Both train (transfer mode 'full').
    assert _changed(initial["params"][group], final["params"][group]), group
  # The EMA is a separate, moving average: neither the start nor the weights.
  assert _changed(final["ema"]["params"], final["params"])
  assert _changed(final["ema"]["params"], initial["params"])
