"""The trainer's refusals and bookkeeping (no training run), and its random streams."""
import jax
import numpy as np
import pytest

from affectjax import config_base
from affectjax import train
from affectjax import train_state
from tests import use_fixtures


def _config(**overrides):
  c = config_base.get_base_config()
  c.data.dir = "/data/prepared"
  return use_fixtures.override(c, **overrides)


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


def test_best_metric_typo_is_refused_before_training(tmp_path):
  train.check_selection(_config())
  for name in train.selection_metrics():
    train.check_selection(_config(**{"checkpoint.best_metric": name}))
  c = _config(**{"checkpoint.best_metric": "macro_f"})
  c.data.dir = str(tmp_path / "never_read")
  workdir = tmp_path / "run"
  with pytest.raises(train.ConfigError,
                     match=r"best_metric='macro_f' is not an evaluation metric "
                     r"\(did you mean 'macro_f1'\?\); choose one of loss, "
                     r"accuracy, macro_f1, valence_rmse, .*arousal_sagr\."):
    train.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()  # Refused before the data, the model, a step.
  with pytest.raises(train.ConfigError, match="needs a metric to watch"):
    train.check_selection(_config(**{"checkpoint.best_metric": "",
                                     "early_stopping_patience": 2}))


def _key_bits(keys):
  return np.asarray(jax.random.key_data(keys))


def test_augmentation_and_dropout_streams_are_split_not_folded():
  seed = 3
  keys = train.stream_keys(seed)
  dropout_root, augment_root = jax.random.split(jax.random.key(seed))
  np.testing.assert_array_equal(_key_bits(keys["dropout"]),
                                _key_bits(dropout_root))
  np.testing.assert_array_equal(_key_bits(keys["augment"]),
                                _key_bits(augment_root))
  # Dropout's key of every step below 2**18 differs from augmentation's.
  steps = np.arange(2**18, dtype=np.uint32)
  dropout = _key_bits(jax.vmap(
      lambda s: jax.random.fold_in(keys["dropout"], s))(steps))
  assert not np.all(dropout == _key_bits(keys["augment"]), axis=-1).any()
  # What folding both into key(seed) did: 0x6175 is step 24,949.
  base = jax.random.key(seed)
  np.testing.assert_array_equal(
      _key_bits(jax.random.fold_in(base, 0x6175)),
      _key_bits(jax.random.fold_in(base, 24_949)))


class _Seen(Exception):
  """Stops the step once both keys are seen (before the model runs)."""


def test_train_step_draws_from_the_split_streams(monkeypatch):
  """The keys the real step hands to augmentation and dropout (run unjitted,
  up to the model's call)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from affectjax import augment, sharding  # pylint: disable=g-import-not-at-top
  from configs import custom_cnn  # pylint: disable=g-import-not-at-top
  config = custom_cnn.get_config("tiny")
  config.seed = 5
  # Zeros of the right shapes (nothing compiled); the optimizer is never
  # reached: the step stops at the model's call.
  graphdef, abstract, _ = train_state.abstract_state(config,
                                                     sharding.make_mesh())
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
  state = {"step": np.int32(7), "params": zeros(abstract["params"]),
           "rest": zeros(abstract["rest"]), "opt_state": None}
  seen = {}

  def images_spy(images, *, key, **kwargs):
    del kwargs
    seen["augment"] = key
    return images

  def rngs_spy(*args, **kwargs):
    del args
    seen["dropout"] = kwargs["dropout"]
    raise _Seen()

  monkeypatch.setattr(augment, "train_images", images_spy)
  monkeypatch.setattr(nnx, "Rngs", rngs_spy)
  n = config.batch_size
  batch = {"image": np.zeros((n, 16, 16, 3), np.uint8),
           "expression": np.arange(n, dtype=np.int32) % 8,
           "valence": np.zeros(n, np.float32), "arousal": np.zeros(n, np.float32)}
  with pytest.raises(_Seen):
    train.train_step(state, batch, graphdef=graphdef, tx=None, config=config,
                     class_weights=None, train_backbone=True)
  keys = train.stream_keys(5)
  np.testing.assert_array_equal(_key_bits(seen["augment"]),
                                _key_bits(keys["augment"]))
  np.testing.assert_array_equal(
      _key_bits(seen["dropout"]),
      _key_bits(jax.random.fold_in(keys["dropout"], 7)))


def test_summary_names_the_last_step_and_shows_the_best_one():
  from affectjax import summary  # pylint: disable=g-import-not-at-top
  last = {"step": 8, "num_examples": 52, "accuracy": 0.25, "macro_f1": 0.5}
  best = {"step": 4, "metric": "macro_f1", "split": "holdout", "value": 0.75,
          "val": {"step": 4, "accuracy": 0.375, "macro_f1": 0.625}}
  lines = summary.table({**last, "best": best}).splitlines()
  assert lines[0] == "Validation at step 8 (52 examples), the last step"
  assert lines[1] == "Best checkpoint: step 4, macro_f1 0.7500 on holdout"
  assert lines[3].split() == ["last,", "step", "8", "best,", "step", "4"]
  row = next(l for l in lines if l.startswith("Expression macro-F1"))
  assert row.split()[-2:] == ["0.5000", "0.6250"]
  # The last step is the best: one column, and the heading says so.
  same = summary.table({**last, "best": {**best, "step": 8, "val": last}})
  assert "step 8, macro_f1 0.7500 on holdout (the last step)" in same
  row = next(l for l in same.splitlines() if l.startswith("Expression macro"))
  assert row.split()[-1] == "0.5000" and len(row.split()) == 3
