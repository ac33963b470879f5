"""The trainer's refusals and bookkeeping that need no training step."""
import pytest

from affectjax import config_base
from affectjax import train
from affectjax import train_state


def _config(**overrides):
  c = config_base.get_base_config()
  c.data.dir = "/data/prepared"
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _manifest(num_classes=8, image_size=320, splits=("train", "val")):
  return {"num_classes": num_classes, "image_size": image_size,
          "splits": {s: {} for s in splits}}


def test_prepared_data_must_fit_the_config():
  train.check_prepared_data(_config(image_size=300), _manifest())
  with pytest.raises(ValueError, match=r"prepared with 7 classes.*"
                     r"--config.num_classes=8.*--classes=8"):
    train.check_prepared_data(_config(), _manifest(num_classes=7))
  with pytest.raises(ValueError, match=r"112 px images but "
                     r"--config.image_size=224.*--image_size=224"):
    train.check_prepared_data(_config(image_size=224), _manifest(image_size=112))


def test_selection_split_prefers_holdout():
  assert train.selection_split(_config(), _manifest()) == "val"
  with_holdout = _manifest(splits=("train", "val", "holdout"))
  assert train.selection_split(_config(), with_holdout) == "holdout"
  assert train.selection_split(_config(**{"data.selection_split": "val"}),
                               with_holdout) == "val"
  with pytest.raises(ValueError, match="--holdout_fraction"):
    train.selection_split(_config(**{"data.selection_split": "holdout"}),
                          _manifest())


def test_compute_dtype_auto_is_float32_on_cpu():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  assert train_state.compute_dtype(_config()) == jnp.float32
  assert train_state.compute_dtype(_config(**{"model.dtype": "bfloat16"})) == jnp.bfloat16
  with pytest.raises(ValueError, match="config.model.dtype"):
    train_state.compute_dtype(_config(**{"model.dtype": "float16"}))


def test_early_stopping_counts_evaluations_and_resumes_from_the_log():
  c = _config(early_stopping_patience=2)
  history = [{"split": "holdout", "step": 1, "macro_f1": 0.5},
             {"split": "val", "step": 1, "macro_f1": 0.9},  # Not selection.
             {"split": "holdout", "step": 2, "macro_f1": 0.6}]
  stopper = train.EarlyStopping(c, history, "holdout")
  assert (stopper.best, stopper.best_step, stopper.stopped) == (0.6, 2, False)
  assert not stopper.update(3, {"macro_f1": 0.55})
  assert stopper.update(4, {"macro_f1": float("nan")})
  assert stopper.stopped
  # Rebuilt from the same log, a resumed run agrees.
  again = train.EarlyStopping(c, history + [
      {"split": "holdout", "step": 3, "macro_f1": 0.55},
      {"split": "holdout", "step": 4, "macro_f1": None}], "holdout")
  assert again.stopped and again.best_step == 2
  # min mode, and patience 0 never stops.
  m = train.EarlyStopping(_config(**{"checkpoint.best_mode": "min",
                                     "checkpoint.best_metric": "loss"}),
                          [], "val")
  for step, loss in enumerate((3.0, 2.0, 2.5, 2.6, 2.7)):
    assert not m.update(step, {"loss": loss})
  assert m.best == 2.0
