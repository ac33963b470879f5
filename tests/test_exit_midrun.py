"""A data file that vanishes, or a record damaged, while a run trains: exit 1
(a failure: read the log), not 2 ("fix the command"), which only the
command's own inputs checked at start get.

Real trainer subprocesses on their own copies of the prepared data, read
from the shards (no pixel cache); each is held with SIGSTOP once it trains,
its val shard deleted or rewritten with records that are not examples, and
released: the first evaluation reads the shard.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from affectjax import data
from tests import use_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100


def _start(data_dir, workdir):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen(
      [sys.executable, "-m", "affectjax.main",
       f"--config={use_fixtures.TINY}:tiny", f"--config.data.dir={data_dir}",
       f"--workdir={workdir}", "--config.data.cache=none",
       f"--config.total_steps={STEPS}", "--config.log_every_steps=1",
       f"--config.eval_every_steps={STEPS}",
       f"--config.checkpoint_every_steps={STEPS}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _trains(workdir) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and any(
      json.loads(l)["split"] == "train" for l in open(path) if l.endswith("\n"))


def _delete(shard):
  os.unlink(shard)


def _damage(shard):
  """The same number of records, none of them a tf.train.Example."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(shard))
  n = reader.num_records()
  reader.close()
  tmp = f"{shard}.tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for _ in range(n):
    writer.write(b"\xff\xff not a record")
  writer.close()
  os.replace(tmp, shard)


@pytest.mark.slow  # Two tiny training runs to their first evaluation.
def test_data_gone_or_damaged_during_training_exits_1(
    procs, synthetic_arrayrecord, tmp_path):
  cases = {"deleted": (_delete, "FileNotFoundError: 1 shard(s) listed"),
           "damaged": (_damage, "RecordError")}
  runs = {}
  for name in cases:
    data_dir = tmp_path / f"{name}_data"
    shutil.copytree(synthetic_arrayrecord, data_dir)
    workdir = tmp_path / name
    runs[name] = (data_dir, workdir, _start(data_dir, workdir))
    procs.append(runs[name][2])
  for name, (data_dir, workdir, p) in runs.items():
    deadline = time.monotonic() + 300
    while not _trains(workdir):
      assert p.poll() is None, p.communicate()[1][-3000:]
      assert time.monotonic() < deadline, "no training step within 300 s"
      time.sleep(0.02)
    p.send_signal(signal.SIGSTOP)
    try:
      cases[name][0](data_dir / data.shard_filename("val", 0, 1))
    finally:
      p.send_signal(signal.SIGCONT)
  for name, (_, workdir, p) in runs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, (name, p.returncode, err[-3000:])
    assert "Traceback" in err and cases[name][1] in err, (name, err[-3000:])
    del workdir
