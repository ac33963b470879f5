"""metrics.jsonl and TensorBoard event files, read back from disk."""
import glob
import json
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from affectjax import metric_log, summary


def _events(logdir):
  """Parses TFRecord-framed Event protos (length, crc, payload, crc)."""
  scalars = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return scalars


def test_jsonl_lines_and_tensorboard_scalars(tmp_path):
  log = metric_log.MetricLog(str(tmp_path))
  log.write("train", 10, loss=np.float32(1.5), grad_norm=0.25)
  log.write("val", 20, loss=0.75, accuracy=0.5, valence_ccc=float("nan"),
            confusion_matrix=np.eye(2, dtype=np.int64))
  log.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"split": "train", "step": 10, "loss": 1.5,
                      "grad_norm": 0.25}
  assert lines[1]["valence_ccc"] is None  # NaN -> null, strict JSON.
  assert lines[1]["confusion_matrix"] == [[1, 0], [0, 1]]
  assert log.has("val", 20) and not log.has("val", 10)
  scalars = _events(str(tmp_path / "tensorboard"))
  assert scalars["train/loss"] == [(10, 1.5)]
  assert scalars["val/accuracy"] == [(20, 0.5)]
  assert "val/confusion_matrix" not in scalars


def test_summary_table_formats_missing_values():
  text = summary.table({"step": 5, "num_examples": 3, "accuracy": 0.5,
                        "valence_ccc": math.nan}, workdir="w")
  assert "Validation at step 5 (3 examples)" in text
  assert "Expression accuracy" in text and "0.5000" in text
  assert "Valence CCC" in text and "n/a" in text


def test_resume_drops_lines_after_the_restored_step(tmp_path):
  """A run killed after logging steps its checkpoint never reached replays
  them: the resumed log must hold each step once."""
  log = metric_log.MetricLog(str(tmp_path))
  for step in (2, 4, 6):
    log.write("train", step, loss=float(step))
  log.write("val", 6, accuracy=0.5)
  log.close()
  resumed = metric_log.MetricLog(str(tmp_path), resume_step=4)
  resumed.write("train", 6, loss=60.0)
  resumed.image("val/confusion_matrix", 6, np.zeros((4, 5, 3), np.uint8))
  resumed.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(l["split"], l["step"], l.get("loss")) for l in lines] == [
      ("train", 2, 2.0), ("train", 4, 4.0), ("train", 6, 60.0)]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "metrics.jsonl", "tensorboard"]  # No temporary file left behind.


def test_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
  """A run killed mid-append leaves half a line: readers skip it, and the
  resumed run removes it before appending (else its next line would be glued
  to the fragment)."""
  log = metric_log.MetricLog(str(tmp_path))
  log.write("train", 2, loss=2.0)
  log.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"split": "train", "st')
  assert metric_log.read(tmp_path) == [{"split": "train", "step": 2,
                                        "loss": 2.0}]
  resumed = metric_log.MetricLog(str(tmp_path), resume_step=2)
  resumed.write("train", 4, loss=4.0)
  resumed.close()
  assert [r["step"] for r in metric_log.read(tmp_path)] == [2, 4]
  # Anywhere but last, a bad line is damage, not a write in progress.
  text = (tmp_path / "metrics.jsonl").read_text()
  (tmp_path / "metrics.jsonl").write_text("oops\n" + text)
  with pytest.raises(ValueError, match="metrics.jsonl line 1"):
    metric_log.read(tmp_path)
