"""Holdout selection and early stopping, through `train_and_evaluate`.

The prepared data here has a `holdout` split and a `val` split that disagree
by construction: `holdout` is the synthetic val split, and `val` is the same
faces with valence negated. Valence PCC on `val` is then exactly minus the
one on `holdout`, so the step that is best on one is the worst on the other:
a `best.json` or an early stop that `val` influenced cannot go unnoticed.
One run is shared: it stops early by the patience rule; then a copy of it,
cut back to an earlier checkpoint, is resumed and must stop at the same step.
"""
import hashlib
import json
import math
import os
import shutil

import pytest

from affectjax import data, train
from configs import custom_cnn

METRIC = "valence_pcc"
PATIENCE = 2
EVERY = 2
TOTAL = 24


@pytest.fixture(scope="module")
def disagreeing_data(synthetic_arrayrecord, tmp_path_factory):
  """The synthetic data with holdout = val, and val's valence negated."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from data_prep import shards  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("selection") / "prepared"
  shutil.copytree(synthetic_arrayrecord, root)
  manifest = json.loads((root / data.MANIFEST_NAME).read_text())
  val = manifest["splits"]["val"]
  records = data.source(str(root), "val").read_records(range(val["rows"]))
  name = "affectnet-val_negated.array_record-00000-of-00001"
  writer = array_record_module.ArrayRecordWriter(
      str(root / name), shards.WRITER_OPTIONS[manifest["encoding"]])
  for record in records:
    example = data.Example.FromString(record)
    valence = example.features.feature["valence"].float_list.value
    valence[0] = -valence[0]  # -2 (no value) becomes 2: still masked.
    writer.write(example.SerializeToString(deterministic=True))
  writer.close()
  blob = (root / name).read_bytes()
  manifest["splits"]["holdout"] = val
  manifest["splits"]["val"] = {
      **val, "shards": [{"file": name, "num_bytes": len(blob),
                         "num_examples": len(records),
                         "sha256": hashlib.sha256(blob).hexdigest()}]}
  (root / data.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
  return str(root)


def _config(data_dir):
  c = custom_cnn.get_config("tiny")
  c.data.dir = data_dir
  c.total_steps = TOTAL
  c.log_every_steps = 1
  c.eval_every_steps = EVERY
  c.checkpoint_every_steps = EVERY
  c.keep_checkpoints = TOTAL  # Every step stays, to resume from any.
  c.checkpoint.best_metric = METRIC
  c.early_stopping_patience = PATIENCE
  return c


def _lines(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _value(record) -> float:
  v = record.get(METRIC)
  return -math.inf if v is None else v


def _patience_stop(lines) -> int | None:
  """The step the patience rule stops at, replayed from the log's lines."""
  best, bad = -math.inf, 0
  for r in lines:
    if _value(r) > best:
      best, bad = _value(r), 0
    else:
      bad += 1
    if bad >= PATIENCE:
      return r["step"]
  return None


def _best_step(lines) -> int:
  """Highest value; of equal ones, the later step (what best.json records)."""
  return max(lines, key=lambda r: (_value(r), r["step"]))["step"]


@pytest.fixture(scope="module")
def stopped_run(disagreeing_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stopped_run"))
  result = train.train_and_evaluate(_config(disagreeing_data), workdir)
  return workdir, result


def test_holdout_picks_the_best_checkpoint_and_val_never_does(stopped_run):
  workdir, _ = stopped_run
  holdout, val = _lines(workdir, "holdout"), _lines(workdir, "val")
  assert [r["step"] for r in holdout] == [r["step"] for r in val]
  for h, v in zip(holdout, val):
    assert h[METRIC] == pytest.approx(-v[METRIC], abs=1e-9), h["step"]
  best = json.load(open(os.path.join(workdir, "checkpoints", "best.json")))
  assert (best["step"], best["metric"]) == (_best_step(holdout), METRIC)
  assert best["value"] == pytest.approx(
      next(r[METRIC] for r in holdout if r["step"] == best["step"]))
  assert _best_step(val) != best["step"]  # The splits disagree.


def test_early_stopping_stops_where_the_patience_rule_says(stopped_run):
  workdir, result = stopped_run
  stop = _patience_stop(_lines(workdir, "holdout"))
  assert stop is not None and stop < TOTAL, "the run never stopped early"
  assert result["early_stopped"] and result["step"] == stop
  assert max(r["step"] for r in _lines(workdir, "train")) == stop
  assert max(r["step"] for r in _lines(workdir, "holdout")) == stop


def test_resumed_run_stops_at_the_same_step(stopped_run, disagreeing_data,
                                            tmp_path):
  workdir, result = stopped_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  # As if killed after the first evaluation's checkpoint.
  ckpt_dir = os.path.join(resumed, "checkpoints")
  for entry in os.listdir(ckpt_dir):
    if entry.isdigit() and int(entry) > EVERY:
      shutil.rmtree(os.path.join(ckpt_dir, entry))
  again = train.train_and_evaluate(_config(disagreeing_data), resumed)
  assert again["early_stopped"] and again["step"] == result["step"]
  for split in ("train", "holdout", "val"):
    assert ([r["step"] for r in _lines(resumed, split)]
            == [r["step"] for r in _lines(workdir, split)]), split
  assert (json.load(open(os.path.join(ckpt_dir, "best.json")))["step"]
          == json.load(open(os.path.join(workdir, "checkpoints",
                                         "best.json")))["step"])


def test_val_off_during_training_reads_only_the_holdout(
    disagreeing_data, tmp_path, monkeypatch):
  """``eval_val_during_training=False``: val's records are never opened while
  training; the result, summary, best checkpoint and report are holdout's."""
  from affectjax import summary  # pylint: disable=g-import-not-at-top
  opened = []
  source = data.source

  def spy(data_dir, split, *args, **kwargs):
    opened.append(split)
    return source(data_dir, split, *args, **kwargs)

  monkeypatch.setattr(data, "source", spy)
  c = _config(disagreeing_data)
  c.total_steps, c.early_stopping_patience = 2 * EVERY, 0
  c.eval_val_during_training = False
  workdir = str(tmp_path)
  result = train.train_and_evaluate(c, workdir)
  assert "val" not in opened and {"train", "holdout"} <= set(opened), opened
  assert _lines(workdir, "val") == []
  assert [r["step"] for r in _lines(workdir, "holdout")] == [EVERY, 2 * EVERY]
  assert (result["split"], result["step"]) == ("holdout", 2 * EVERY)
  best = result["best"]
  assert best["split"] == "holdout" and best["val"] is None
  assert best["result"] == next(r for r in _lines(workdir, "holdout")
                                if r["step"] == best["step"])
  table = summary.table(result, workdir=workdir)
  assert table.startswith(f"Holdout at step {2 * EVERY} (52 examples), the "
                          "last step"), table
  assert f"on holdout" in table and "n/a" not in table.split("\n")[3], table
  with open(os.path.join(workdir, "report.html")) as f:
    report = f.read()
  assert f"Latest evaluation: holdout at step {2 * EVERY}" in report
  assert "circumplex.png" in report  # The holdout's examples.
  # A rerun of the finished run only evaluates, again the holdout.
  opened.clear()
  again = train.train_and_evaluate(c, workdir)
  assert again["split"] == "holdout" and "val" not in opened, opened
