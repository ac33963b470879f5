"""Fine-tuning a trained run (``--config.init_from``), on real tiny runs.

Two source runs, trained here on real prepared data: a 7-class run whose
data has no valence/arousal (FER2013's shape: AffectNet's first 7 names,
every valence/arousal -2) with EMA weights, and an 8-class run on the
synthetic AffectNet (valence/arousal learned), without EMA. Their
checkpoints are read back with Orbax alone (not through the code under
test) and compared exactly with what a fine-tune starts from.
"""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from affectjax import cli, data, evaluate, init_from, report, run_contract
from affectjax import sharding, train, train_state
from configs import custom_cnn
from configs.recipes import finetune
from tests import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


@pytest.fixture(scope="module")
def no_va_data(tmp_path_factory):
  """A 7-class prepared set without valence/arousal (-2, AffectNet's "no
  value", in every row), like FER2013 and FER+."""
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("no_va")
  synthetic.generate(str(root / "raw"), num_train=48, num_val=24, seed=1)
  for name in ("training.csv", "validation.csv"):
    path = root / "raw" / name
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      for r in rows:
        w.writerow({**r, "valence": "-2", "arousal": "-2"})
  affectnet.prepare(str(root / "raw"), str(root / "prepared"), image_size=24,
                    classes=7, num_workers=1)
  return str(root / "prepared")


# The tiny config's changes for these runs: two steps, each saved, one
# evaluation at the end (and warmup off, else step 0's rate moves nothing).
_SHORT = {"total_steps": STEPS, "eval_every_steps": STEPS,
          "checkpoint_every_steps": 1, "keep_checkpoints": STEPS,
          "optimizer.warmup_steps": 0}


def _config(data_dir, num_classes, **fields):
  c = custom_cnn.get_config("tiny")
  c.data.dir = data_dir
  c.num_classes = num_classes
  for key, value in {**_SHORT, **fields}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def source7(no_va_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("source7") / "run")
  train.train_and_evaluate(_config(no_va_data, 7, ema_decay=0.5), workdir)
  return workdir


@pytest.fixture(scope="module")
def source8(synthetic_arrayrecord, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("source8") / "run")
  train.train_and_evaluate(_config(synthetic_arrayrecord, 8), workdir)
  return workdir


def _checkpoint(workdir, step=None) -> dict:
  """{"params"|"rest"|"ema/params"|..., name: array} of a checkpoint, read
  with Orbax alone onto one device (the latest step by default)."""
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if step is None:
    step = max(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit())
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    path = ckpt_dir / str(step) / "state"
    meta = c.metadata(path)
    tree = c.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
        getattr(meta, "item_metadata", meta)))
  return _named(tree)


def _named(tree) -> dict:
  """{"params/backbone/.../kernel": array}: nnx states and Orbax's plain
  dicts (whose leaves sit under a "value" key) name alike."""
  return {"/".join(n for n in init_from._path(p) if n != "value"):
          np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _start(config, workdir):
  """(fresh state, started state) as named host arrays, as the trainer
  starts a run with no checkpoint of its own; and its contract file."""
  mesh = sharding.make_mesh()
  _, state, tx = train_state.init_state(config, mesh)
  manifest = data.read_manifest(config.data.dir)
  os.makedirs(workdir, exist_ok=True)
  run_contract.write(workdir, config, manifest)
  fresh = _named(jax.device_get(state))
  started = init_from.start(config, workdir, state, tx, mesh, manifest)
  with open(os.path.join(workdir, run_contract.FILE_NAME)) as f:
    contract = json.load(f)
  return fresh, _named(jax.device_get(started)), contract


def _split(named: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}


def test_contract_records_whether_the_data_had_valence_arousal(source7,
                                                               source8):
  va7 = json.load(open(os.path.join(source7, "run_contract.json")))
  va8 = json.load(open(os.path.join(source8, "run_contract.json")))
  assert va7["valence_arousal"] == {
      "train_examples": 46, "with_valence": 0, "with_arousal": 0,
      "learned": {"valence": False, "arousal": False}}
  assert va8["valence_arousal"]["with_valence"] == 160
  assert va8["valence_arousal"]["learned"] == {"valence": True,
                                               "arousal": True}
  assert run_contract.load(source8, None).learned_valence_arousal() == (
      True, True)


def test_7_to_8_carries_the_source_and_leaves_contempt_fresh(
    source7, synthetic_arrayrecord, tmp_path):
  src = _checkpoint(source7)  # The best step is the last (one evaluation).
  config = _config(synthetic_arrayrecord, 8, init_from=source7, ema_decay=0.5)
  fresh, started, contract = _start(config, str(tmp_path / "ft"))
  ema = _split(src, "ema/")
  assert not all(np.array_equal(ema[k], src[k]) for k in ema), (
      "EMA and raw weights should differ after training")
  carried = 0
  for key, value in _split(started, "params/").items():
    if key.startswith(("head/expression", "head/valence_arousal")):
      continue
    np.testing.assert_array_equal(value, ema[f"params/{key}"], err_msg=key)
    carried += 1
  assert carried == 14  # 4 convs x (kernel, BN scale, bias) + hidden (2).
  for key, value in _split(started, "rest/").items():  # BatchNorm statistics.
    np.testing.assert_array_equal(value, ema[f"rest/{key}"], err_msg=key)
  for leaf in ("kernel", "bias"):
    new = started[f"params/head/expression/{leaf}"]
    np.testing.assert_array_equal(new[..., :7],
                                  ema[f"params/head/expression/{leaf}"])
    np.testing.assert_array_equal(new[..., 7],  # contempt: this run's init.
                                  fresh[f"params/head/expression/{leaf}"][..., 7])
    # The source never saw valence/arousal: that head starts fresh.
    np.testing.assert_array_equal(started[f"params/head/valence_arousal/{leaf}"],
                                  fresh[f"params/head/valence_arousal/{leaf}"])
  assert started["step"] == 0
  assert all(not v.any() for k, v in _split(started, "opt_state/").items()
             if v.dtype == np.float32), "the optimizer state starts anew"
  for key, value in _split(started, "params/").items():  # EMA = the start.
    np.testing.assert_array_equal(started[f"ema/params/{key}"], value)
  record = contract["init_from"]
  assert record["workdir"] == source7 and record["step"] == STEPS
  assert record["checkpoint"] == "best" and record["ema"] is True
  assert record["classes"] == {"carried": list(data.label_names(7)),
                               "new": ["contempt"], "dropped": []}
  assert record["valence_arousal"]["valence"] == "fresh"
  src_contract = json.load(open(os.path.join(source7, "run_contract.json")))
  assert record["data_fingerprint"] == src_contract["data"]["fingerprint"]
  assert contract["version"] == run_contract.VERSION
  assert run_contract.load(str(tmp_path / "ft"), config).init_from == record


def test_raw_weights_and_a_chosen_step(source7, synthetic_arrayrecord,
                                       tmp_path):
  src = _checkpoint(source7, step=1)
  config = _config(synthetic_arrayrecord, 8, init_from=source7,
                   init_checkpoint="1", init_use_ema=False)
  _, started, contract = _start(config, str(tmp_path / "ft"))
  for key, value in _split(started, "params/backbone/").items():
    np.testing.assert_array_equal(value, src[f"params/backbone/{key}"])
  assert contract["init_from"]["step"] == 1
  assert contract["init_from"]["ema"] is False


def test_8_to_7_drops_contempt_and_carries_learned_valence_arousal(
    source8, no_va_data, tmp_path):
  src = _checkpoint(source8)  # No EMA in this run: its raw weights.
  config = _config(no_va_data, 7, init_from=source8)
  _, started, contract = _start(config, str(tmp_path / "ft"))
  for leaf in ("kernel", "bias"):
    source_expr = src[f"params/head/expression/{leaf}"]
    np.testing.assert_array_equal(started[f"params/head/expression/{leaf}"],
                                  source_expr[..., :7])
    np.testing.assert_array_equal(
        started[f"params/head/valence_arousal/{leaf}"],
        src[f"params/head/valence_arousal/{leaf}"])
  record = contract["init_from"]
  assert record["classes"]["dropped"] == ["contempt"]
  assert record["classes"]["new"] == []
  assert record["ema"] is False
  assert {record["valence_arousal"][t] for t in init_from.VA_TARGETS} == {
      "carried"}


def test_a_source_without_the_record_is_checked_against_its_data(
    source8, tmp_path, no_va_data):
  """A run from before the record: its data dir decides; gone, the head
  starts fresh."""
  old = str(tmp_path / "old")
  shutil.copytree(source8, old)
  path = os.path.join(old, "run_contract.json")
  obj = json.load(open(path))
  del obj["valence_arousal"]
  json.dump(obj, open(path, "w"))
  config = _config(no_va_data, 7, init_from=old)
  _, _, contract = _start(config, str(tmp_path / "ft1"))
  va = contract["init_from"]["valence_arousal"]
  assert (va["valence"], va["arousal"]) == ("carried", "carried")
  assert "data dir" in va["source_learned_from"]
  cfg = json.load(open(os.path.join(old, "config.json")))
  cfg["data"]["dir"] = str(tmp_path / "gone")
  json.dump(cfg, open(os.path.join(old, "config.json"), "w"))
  fresh, started, contract = _start(config, str(tmp_path / "ft2"))
  va = contract["init_from"]["valence_arousal"]
  assert (va["valence"], va["arousal"]) == ("fresh", "fresh")
  np.testing.assert_array_equal(started["params/head/valence_arousal/kernel"],
                                fresh["params/head/valence_arousal/kernel"])


@pytest.mark.parametrize("fields, words", [
    ({"model.kwargs.widths": (4, 6)},
     ["trained custom_cnn(widths=(4, 8))",
      "this run builds custom_cnn(widths=(4, 6))"]),
    ({"model.kwargs.head_hidden": 32},
     ["a head with 256 hidden units, this run 32",
      "--config.model.kwargs.head_hidden=256"]),
    ({"init_checkpoint": "7"}, ["--config.init_checkpoint=7: no such step"]),
])
def test_mismatches_stop_the_run_naming_both(source7, synthetic_arrayrecord,
                                             tmp_path, fields, words):
  config = _config(synthetic_arrayrecord, 8, init_from=source7, **fields)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    _start(config, str(tmp_path / "ft"))
  for w in words:
    assert w in str(e.value)
  assert cli.exit_status(e.value) == cli.USAGE_ERROR


def test_imagenet_and_init_from_together_stop_before_anything(
    source7, synthetic_arrayrecord, tmp_path):
  config = _config(synthetic_arrayrecord, 8, init_from=source7)
  config.model.init = "imagenet"  # small_run set 'scratch'; a user sets this.
  with pytest.raises(ValueError, match="--config.model.init=scratch") as e:
    train.train_and_evaluate(config, str(tmp_path / "ft"))
  assert cli.exit_status(e.value) == cli.USAGE_ERROR
  assert not os.path.exists(tmp_path / "ft" / "checkpoints")


def _main(args, *, env=None, check=None) -> subprocess.CompletedProcess:
  """The trainer's command line (tiny config, one device) in a subprocess."""
  env = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run(
      [sys.executable, "-m", "affectjax.main",
       "--config=configs/custom_cnn.py:tiny", "--config.compilation_cache_dir=",
       *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  if check is not None:
    assert proc.returncode == check, proc.stderr[-3000:]
  return proc


def test_cli_another_width_exits_2(source7, synthetic_arrayrecord, tmp_path):
  proc = _main([f"--workdir={tmp_path / 'ft'}",
                f"--config.data.dir={synthetic_arrayrecord}",
                f"--config.init_from={source7}",
                "--config.model.kwargs.widths=(4,6)"], check=2)
  last = proc.stderr.strip().splitlines()[-1]
  assert "custom_cnn(widths=(4, 8))" in last and "(4, 6)" in last, last
  assert "Traceback" not in proc.stderr


def test_fine_tune_frozen_resumes_without_the_source(
    source7, synthetic_arrayrecord, tmp_path):
  """Through the trainer: a frozen backbone stays the source's, bit for bit;
  a resume continues the fine-tuned run and never reads the source (moved
  away), ending where the uninterrupted run ended; evaluate and the report
  say where it started."""
  src = _checkpoint(source7)
  moved = str(tmp_path / "source_moved")
  shutil.copytree(source7, moved)
  config = _config(synthetic_arrayrecord, 8, init_from=moved, ema_decay=0.5,
                   **{"transfer.mode": "frozen"})
  ft = str(tmp_path / "ft")
  train.train_and_evaluate(config, ft)
  end = _checkpoint(ft)
  for key, value in _split(end, "params/backbone/").items():
    np.testing.assert_array_equal(value, src[f"ema/params/backbone/{key}"])
  for key, value in _split(end, "rest/backbone/").items():
    np.testing.assert_array_equal(value, src[f"ema/rest/backbone/{key}"])
  assert not np.array_equal(end["params/head/expression/kernel"][:, :7],
                            src["ema/params/head/expression/kernel"])

  cut = str(tmp_path / "cut")
  shutil.copytree(ft, cut)
  shutil.rmtree(os.path.join(cut, "checkpoints", str(STEPS)))
  os.remove(os.path.join(cut, "checkpoints", "best.json"))
  shutil.rmtree(moved)  # The source is gone: a resume must not need it.
  train.train_and_evaluate(config, cut)
  resumed = _checkpoint(cut)
  assert resumed.keys() == end.keys()
  for key in end:
    np.testing.assert_array_equal(resumed[key], end[key], err_msg=key)
  contract = json.load(open(os.path.join(cut, "run_contract.json")))
  assert contract["init_from"]["workdir"] == moved  # Kept by the resume.

  result, out = evaluate.run_evaluation(ft, checkpoint="latest")
  assert result["init_from"]["workdir"] == moved
  assert json.load(open(out / "metrics.json"))["init_from"]["step"] == STEPS
  line = init_from.describe(result["init_from"])
  assert line.startswith(f"Fine-tuned from {moved} at step {STEPS}")
  assert "new classes: contempt" in line
  html_text = report.build_report(ft, config)
  assert "<h2>Started from</h2>" in html_text and "new classes: contempt" in (
      html_text)


@pytest.mark.slow
def test_a_source_on_gcs(synthetic_arrayrecord, no_va_data, tmp_path):
  """The source run trained to gs:// (the GCS emulator); a fine-tune starts
  from it there, its weights read by Orbax's gcs driver."""
  emulator = gcs_emulator.Emulator(tmp_path / "emulator.log",
                                   buckets=("bucket",), deadline_s=600)
  with emulator, pytest.MonkeyPatch.context() as mp:
    for k, v in emulator.env().items():
      mp.setenv(k, v)
    source = "gs://bucket/source"
    # In a process of its own, which ends while the emulator still answers
    # (TensorBoard's gs:// writer uploads again when collected at exit).
    _main([f"--workdir={source}", f"--config.data.dir={no_va_data}",
           "--config.num_classes=7", "--config.ema_decay=0.5",
           *(f"--config.{k}={v}" for k, v in _SHORT.items())],
          env=emulator.env(), check=0)
    src = _checkpoint(source)
    config = _config(synthetic_arrayrecord, 8, init_from=source)
    _, started, contract = _start(config, str(tmp_path / "ft"))
  for key, value in _split(started, "params/backbone/").items():
    np.testing.assert_array_equal(value, src[f"ema/params/backbone/{key}"])
  assert contract["init_from"]["workdir"] == source
  assert contract["init_from"]["classes"]["new"] == ["contempt"]


def test_finetune_recipe_tiny_from_a_7_class_run_learns_valence_arousal(
    source7, synthetic_arrayrecord, tmp_path):
  """configs/recipes/finetune.py:tiny (widths (4, 8), as the tests' source)
  from the 7-class run without valence/arousal onto the 8-class synthetic
  set with them: contempt and the valence/arousal head start fresh, and the
  new run learns valence/arousal (its contract records it)."""
  config = finetune.get_config("tiny")
  config.data.dir = synthetic_arrayrecord
  config.init_from = source7
  config.total_steps = STEPS
  config.eval_every_steps = STEPS
  assert config.model.init == "scratch" and config.loss.va_ccc_weight > 0
  ft = str(tmp_path / "ft")
  result = train.train_and_evaluate(config, ft)
  assert result["step"] == STEPS and np.isfinite(result["loss"])
  contract = json.load(open(os.path.join(ft, "run_contract.json")))
  assert contract["init_from"]["classes"]["new"] == ["contempt"]
  assert contract["init_from"]["valence_arousal"]["valence"] == "fresh"
  assert contract["valence_arousal"]["learned"] == {"valence": True,
                                                    "arousal": True}
