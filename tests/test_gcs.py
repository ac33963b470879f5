"""Workdir and data on ``gs://``, through the clients users run, against a
local GCS emulator (``tests/gcs_emulator.py``; started and stopped here).

The prepared data is uploaded to ``gs://bucket/data`` and training runs with
``--workdir=gs://bucket/run``: etils.epath (gcsfs) for config, metrics and
best.json, Orbax/tensorstore's ``gcs`` driver for the checkpoints,
ArrayRecord's own GCS reader for the shards. The run is killed with
SIGKILL after its first checkpoint and rerun to the end; then evaluate,
predict and export read the run from ``gs://`` and write there. The
compilation cache is on ``gs://`` too: the rerun reads the train step the
first run compiled.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import pytest
from etils import epath

from tests import gcs_emulator

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 8
EVERY = 4  # Evaluation and checkpoint period.
DATA = "gs://bucket/data"
RUN = "gs://bucket/run"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, and this process's GCS clients pointed at it."""
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  emulator = gcs_emulator.Emulator(log, buckets=("bucket",), deadline_s=1200)
  mp = pytest.MonkeyPatch()
  with emulator:
    for k, v in emulator.env().items():
      mp.setenv(k, v)
    yield emulator
    mp.undo()


def _metric_lines() -> list[dict]:
  _uncached()
  from affectjax import metric_log  # pylint: disable=g-import-not-at-top
  return metric_log.read(RUN)


def _start(args, env_extra, log_path):
  # Every compiled program goes to the compilation cache (not only those
  # over a second), and each compile says whether the cache had it (JAX
  # logs "Persistent compilation cache hit for '<module>'" at WARNING).
  env = {**os.environ, **env_extra, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_LOG_COMPILES": "1"}
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "affectjax.main", *args],
                            cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _tail(path, n=4000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _uncached() -> None:
  """Drops this process's gcsfs listing cache.

  gcsfs caches directory listings per process and does not see what other
  processes (the trainer) or tensorstore wrote since; this test reads as an
  outside observer would, from the bucket itself.
  """
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  backend.fsspec_backend.fs(RUN).invalidate_cache()


def _committed(step: int) -> bool:
  """Whether Orbax finished saving ``step`` (on GCS: ``commit_success.txt``,
  written last)."""
  _uncached()
  return (epath.Path(RUN) / "checkpoints" / str(step) /
          "commit_success.txt").exists()


def _partial() -> epath.Path:
  return epath.Path(RUN) / "checkpoints" / str(TOTAL) / "state" / "partial"


@pytest.fixture(scope="module")
def gcs_run(gcs, synthetic_arrayrecord, tmp_path_factory):
  """Trains on gs://, kill -9 after the first checkpoint, reruns to the end.

  Returns (log of the killed run, log of the rerun).
  """
  tmp = tmp_path_factory.mktemp("gcs_run")
  for name in os.listdir(synthetic_arrayrecord):
    local = os.path.join(synthetic_arrayrecord, name)
    if os.path.isfile(local):  # Not data_prep's resume state.
      epath.Path(local).copy(epath.Path(DATA) / name)
  args = ["--config=configs/custom_cnn.py:tiny", f"--config.data.dir={DATA}",
          f"--workdir={RUN}", f"--config.total_steps={TOTAL}",
          "--config.log_every_steps=1", f"--config.eval_every_steps={EVERY}",
          f"--config.checkpoint_every_steps={EVERY}",
          f"--config.data.cache={tmp / 'pixels'}",
          "--config.compilation_cache_dir=gs://bucket/jax_cache"]
  killed_log, rerun_log = tmp / "killed.log", tmp / "rerun.log"
  proc = _start(args, gcs.env(), killed_log)
  try:
    deadline = time.monotonic() + 300
    while not _committed(EVERY):
      if proc.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"no committed step-{EVERY} checkpoint on gs:// (exit "
                    f"{proc.poll()}):\n{_tail(killed_log)}\n"
                    f"emulator:\n{gcs.log()}")
      time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  train_steps = [l["step"] for l in _metric_lines() if l["split"] == "train"]
  assert max(train_steps, default=0) < TOTAL, "the run reached its last step"
  assert list((epath.Path("gs://bucket/jax_cache")).iterdir()), (
      "no compiled program in the gs:// compilation cache")
  # A save cut short as well: the last step's directory, without the
  # commit_success.txt that Orbax writes last on GCS (no atomic rename there).
  _partial().write_text("cut short")

  # The rerun reads every batch from the shards on gs:// (no pixel cache),
  # as a job that comes back on a host without the first one's cache does.
  proc = _start([*args, "--config.data.cache=none"], gcs.env(), rerun_log)
  try:
    proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, f"{_tail(rerun_log)}\nemulator:\n{gcs.log()}"
  return _tail(killed_log, 10**7), _tail(rerun_log, 10**7)  # Whole logs.


def test_train_killed_and_resumed_on_gcs(gcs_run):
  killed, rerun = gcs_run
  assert f"Resumed from {RUN}/checkpoints at step {EVERY}" in rerun, rerun
  # The first run compiled its train step and wrote it to the gs:// cache;
  # the rerun read it from there instead of compiling it again.
  hit = re.compile(r"Persistent compilation cache hit for '[^']*train_step")
  assert not hit.search(killed), killed
  assert hit.search(rerun), rerun
  # metrics.jsonl on gs:// holds every step once (object stores cannot
  # append; the lines after the resumed step were dropped and replayed).
  keys = [(l["split"], l["step"]) for l in _metric_lines()]
  assert sorted(k for k in keys if k[0] == "train") == [
      ("train", s) for s in range(1, TOTAL + 1)], keys
  assert [k for k in keys if k[0] == "val"] == [("val", EVERY), ("val", TOTAL)]
  assert _committed(TOTAL) and not _partial().exists()
  best = json.loads((epath.Path(RUN) / "checkpoints" / "best.json").read_text())
  assert best["step"] in (EVERY, TOTAL)
  config = json.loads((epath.Path(RUN) / "config.json").read_text())
  assert config["data"]["dir"] == DATA
  # Nothing went to a local directory named after the URL.
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_evaluate_predict_export_from_gcs(gcs_run, synthetic_arrayrecord):
  from affectjax import evaluate, export, predict  # pylint: disable=g-import-not-at-top

  _uncached()
  # Evaluate: the run's own data (gs://), results written under the run.
  result, out = evaluate.run_evaluation(RUN, checkpoint="latest")
  assert result["step"] == TOTAL and str(out).startswith(RUN + "/eval/")
  written = json.loads((out / "metrics.json").read_text())
  assert written["accuracy"] == pytest.approx(result["accuracy"])
  rows = (out / "predictions.csv").read_text().splitlines()
  assert len(rows) == 1 + 52  # Header + every val example.

  # Predict: images in a gs:// folder, the CSV written to gs://.
  raw = os.path.join(os.path.dirname(synthetic_arrayrecord), "raw",
                     "Manually_Annotated_Images")
  local = sorted(os.path.join(r, f) for r, _, fs in os.walk(raw)
                 for f in fs if f.endswith(".jpg"))[:3]
  for i, path in enumerate(local):
    epath.Path(path).copy(epath.Path(f"gs://bucket/images/{i}.jpg"))
  predictor = predict.Predictor.from_workdir(RUN, checkpoint="latest",
                                             batch_size=4)
  items = predict.expand_inputs(["gs://bucket/images"])
  assert [i.path for i in items] == [f"gs://bucket/images/{i}.jpg"
                                     for i in range(3)]
  rows = predictor.predict(items)
  assert [r["status"] for r in rows] == ["ok"] * 3, rows
  predict.write_rows(rows, predictor.columns(), "gs://bucket/out/pred.csv")
  csv_lines = epath.Path("gs://bucket/out/pred.csv").read_text().splitlines()
  assert len(csv_lines) == 4 and csv_lines[1].startswith("gs://bucket/images/0")

  # Export: the artifact under the run, read back from gs://.
  art = export.run_export(RUN, checkpoint="latest", platforms=("cpu",))
  assert str(art) == f"{RUN}/export/latest"
  exported = jax.export.deserialize(
      bytearray((art / export.MODEL_FILE).read_bytes()))
  size = predictor.input_size
  assert exported.in_avals[0].shape[1:] == (size, size, 3)
  signature = json.loads((art / "signature.json").read_text())
  assert signature["source"] == {**signature["source"], "workdir": RUN,
                                 "step": TOTAL}
