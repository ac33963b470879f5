"""The tools' output: no library INFO chatter, user mistakes in one line,
exit statuses a failure policy can trust (2 only for "fix the command").

Real subprocesses of the entry points, started together (each spends most of
its time importing JAX and Orbax).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from affectjax import cli
from affectjax import data
from tests import use_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's line prefix: I1129 16:55:35.828131 1405835 checkpoint_manager.py:701]
_INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\]", re.M)
_OURS = {name for package in ("affectjax", "data_prep")
         for _, _, files in os.walk(os.path.join(REPO, package))
         for name in files if name.endswith(".py")}


def _start(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, synthetic_arrayrecord):
  """{case: (exit status, stdout + stderr)} of four tool runs."""
  tmp = tmp_path_factory.mktemp("cli")
  # A workdir whose trainer wrote config.json but no checkpoint yet: opening
  # it starts Orbax (which logs at INFO), then stops at a user's mistake.
  workdir = tmp / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(
      use_fixtures.tiny_config(synthetic_arrayrecord).to_json_best_effort())
  no_manifest = tmp / "not_prepared"
  no_manifest.mkdir()
  procs = {
      "quiet": _start("affectjax.evaluate", f"--workdir={workdir}"),
      "verbose": _start("affectjax.evaluate", f"--workdir={workdir}",
                        "--verbosity=0"),
      "no_config": _start("affectjax.main", "--config=configs/nope.py",
                          f"--workdir={tmp / 'w1'}"),
      "no_manifest": _start("affectjax.main",
                            f"--config={use_fixtures.TINY}:tiny",
                            f"--config.data.dir={no_manifest}",
                            f"--workdir={tmp / 'w2'}"),
  }
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=240)
    out[name] = (proc.returncode, stdout + stderr)
  return out


@pytest.mark.slow  # Four tool processes, each importing JAX and Orbax.
def test_library_info_lines_only_when_asked_for(outputs):
  _, quiet = outputs["quiet"]
  _, verbose = outputs["verbose"]
  assert "checkpoint_manager.py" in _INFO.findall(verbose), verbose
  assert [f for f in _INFO.findall(quiet) if f not in _OURS] == [], quiet


@pytest.mark.slow
@pytest.mark.parametrize("case, needle", [
    ("quiet", "holds no checkpoint yet"),
    ("no_config", "nope.py"),
    ("no_manifest", "manifest.json not found")])
def test_user_mistake_is_one_message_without_traceback(outputs, case, needle):
  status, text = outputs[case]
  assert status == cli.USAGE_ERROR, text
  assert "Traceback" not in text, text
  tool = "affectjax.evaluate" if case == "quiet" else "affectjax.main"
  ours = [l for l in text.splitlines() if l.startswith(f"{tool}: ")]
  assert len(ours) == 1 and needle in ours[0], text


def _raised(fn, *args):
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return e
  raise AssertionError(f"{fn} raised nothing")


def test_only_deliberate_mistakes_exit_2():
  """Exit 2 means "fix the command"; I/O failures and bugs exit 1."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from affectjax import checkpoint, distributed, train  # pylint: disable=g-import-not-at-top
  usage = [
      _raised(data.label_names, 5),  # affectjax's message naming what to do.
      _raised(train.train_and_evaluate,  # ConfigError, before any training.
              use_fixtures.override(use_fixtures.tiny_config(""), **{
                  "data.dir": ""}), "/nonexistent/wd"),
      FileNotFoundError("W/config.json not found"),  # A path a flag names.
      app.UsageError("--preempted_exit_code=1: use 0 or 3-125"),
  ]
  failures = [
      _raised(json.loads, "{"),  # A ValueError from inside a library.
      # A ValueError from int() on a line of affectjax's: a bug, not a
      # message for the user.
      _raised(distributed.resolve_local_device_ids, None, {
          "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_LOCALID": "x",
          "SLURM_NTASKS_PER_NODE": "2"}),
      OSError(28, "No space left on device"),
      PermissionError(13, "Permission denied"),
      ConnectionError("connection reset by peer"),
      TimeoutError("storage timed out"),
      checkpoint.CheckpointWriteError("Could not save the checkpoint of ..."),
  ]
  assert isinstance(usage[1], train.ConfigError), usage[1]
  assert isinstance(failures[1], ValueError) and "invalid literal" in str(
      failures[1])
  for e in usage:
    assert cli.exit_status(e) == cli.USAGE_ERROR, repr(e)
  for e in failures:
    assert cli.exit_status(e) == cli.FAILURE, repr(e)


@pytest.mark.parametrize("tool", ["evaluate", "predict", "export"])
def test_a_bad_flag_of_a_tool_exits_2(tool):
  """Parsed by cli.parse_flags, as the trainer's: absl's parser exits 1."""
  p = subprocess.run([sys.executable, "-m", f"affectjax.{tool}",
                      "--no_such_flag=1"], cwd=REPO, capture_output=True,
                     text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == cli.USAGE_ERROR, p.stderr[-2000:]
  assert "Unknown command line flag 'no_such_flag'" in p.stderr
  assert "Traceback" not in p.stderr
