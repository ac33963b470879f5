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


def _write_ferplus_folders(root, per_split=(("FER2013Train", 32),
                                            ("FER2013Valid", 8),
                                            ("FER2013Test", 8))) -> dict:
  """FERPlus's PNG folders with label.csv, enough rows for a batch: face i of
  a folder gets all ten votes for emotion i % 8 (neutral ... contempt)."""
  import public_fixtures  # pylint: disable=g-import-not-at-top
  want = {}
  for folder, n in per_split:
    lines = []
    for i in range(n):
      name = f"fer{i:07d}.png"
      public_fixtures._write(  # pylint: disable=protected-access
          os.path.join(root, folder, name),
          public_fixtures._png(public_fixtures.face_pixels(i)))  # pylint: disable=protected-access
      votes = [0] * 10
      votes[i % 8] = 10
      lines.append(f'{name},"(0, 0, 48, 48)",' + ",".join(map(str, votes)))
    public_fixtures._write(os.path.join(root, folder, "label.csv"),  # pylint: disable=protected-access
                           "\n".join(lines) + "\n")
    split = {"FER2013Train": "train", "FER2013Valid": "holdout",
             "FER2013Test": "val"}[folder]
    want[split] = {"written": n}
  return want


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fer2013", "ferplus"])
def test_fer_recipes_train_on_a_set_without_valence_arousal(recipe, tmp_path):
  """configs/recipes/{fer2013,ferplus}.py:tiny on tiny copies of the published
  files (Kaggle's fer2013.csv; FERPlus's folders with label.csv): no
  valence/arousal, 7 and 8 classes. The trainer masks the missing targets
  (finite loss, no regression metrics), selects on the holdout (PublicTest)
  by accuracy and evaluates only it while training; PrivateTest is read
  once, after, by evaluate, every face of it."""
  import importlib  # pylint: disable=g-import-not-at-top
  import public_fixtures  # pylint: disable=g-import-not-at-top
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  writer = (public_fixtures.write_fer2013 if recipe == "fer2013"
            else _write_ferplus_folders)
  want = writer(str(tmp_path / "raw"))
  manifest = prepare.prepare(str(tmp_path / "raw"), str(tmp_path / "data"),
                             image_size=16, num_workers=1, progress=False)
  config = importlib.import_module(f"configs.recipes.{recipe}").get_config("tiny")
  assert manifest["num_classes"] == config.num_classes
  config.data.dir = str(tmp_path / "data")
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(config, str(workdir))
  assert result["step"] == config.total_steps and np.isfinite(result["loss"])
  assert result["split"] == "holdout"
  assert result["num_examples"] == want["holdout"]["written"] > 0
  assert result["best"]["split"] == "holdout"
  assert result["best"]["metric"] == "accuracy"
  with open(workdir / "metrics.jsonl") as f:
    lines = [json.loads(l) for l in f]
  assert not [l for l in lines if l["split"] == "val"]  # PrivateTest unread.
  from affectjax import evaluate  # pylint: disable=g-import-not-at-top
  private, _ = evaluate.run_evaluation(str(workdir), split="val",
                                       write_files=False)
  assert private["num_examples"] == want["val"]["written"] > 0
  assert all(np.isfinite(l["loss"]) for l in lines if l["split"] == "train")
  holdout = [l for l in lines if l["split"] == "holdout"]
  assert holdout and all(
      l["num_examples"] == want["holdout"]["written"] for l in holdout)
  # Nothing to regress against: no valence/arousal metric is reported.
  assert all(l.get("valence_ccc") is None for l in holdout)
