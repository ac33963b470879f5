"""The tools' output: no library INFO chatter, user mistakes in one line.

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
  assert re.search(rf"^{re.escape(tool)}: .*{re.escape(needle)}", text,
                   re.M | re.S), text


def test_a_library_value_error_keeps_its_traceback():
  """A ValueError from inside a library is likely a bug, not a mistake."""
  with pytest.raises(ValueError) as library:
    json.loads("{")  # Raised inside the json module.
  assert not cli.is_user_error(library.value)
  with pytest.raises(ValueError) as ours:
    data.label_names(5)  # affectjax's own message naming what to do.
  assert cli.is_user_error(ours.value)
  assert cli.is_user_error(FileNotFoundError("W/config.json not found"))
