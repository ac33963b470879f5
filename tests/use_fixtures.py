"""One tiny trained workdir shared by the after-training tests (evaluate,
predict, export, report).

Each test module declares a session fixture that calls `trained_workdir`;
the run is made once per pytest session (a marker file tells later callers
it is there), so the modules share one 6-step training run.
"""
from __future__ import annotations

import os
import pathlib

TINY = "configs/custom_cnn.py"


def tiny_config(data_dir: str):
  """The tests' tiny custom CNN (16 px, widths (4, 8)) on `data_dir`."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "custom_cnn_cfg", pathlib.Path(__file__).parents[1] / TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  del config_flags
  c = mod.get_config("tiny")
  c.data.dir = data_dir
  c.eval_batch_size = 16  # 52 val examples: 4 batches, the last one padded.
  return c


def trained_workdir(tmp_path_factory, data_dir: str) -> pathlib.Path:
  """Trains the tiny model for 6 steps (checkpoints and evals at 3 and 6).

  AFFECTJAX_TEST_RUN_DIR=DIR keeps the run in DIR across pytest sessions
  (for iterating on these tests; DIR/workdir/config.json names its data).
  """
  keep = os.environ.get("AFFECTJAX_TEST_RUN_DIR")
  root = (pathlib.Path(keep) if keep else
          tmp_path_factory.getbasetemp() / "use_trained_run")
  done = root / "DONE"
  if done.exists():
    return root / "workdir"
  from affectjax import train  # pylint: disable=g-import-not-at-top
  if keep:  # The data must outlive this session too.
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.copytree(data_dir, root / "data", dirs_exist_ok=True)
    data_dir = str(root / "data")
  root.mkdir(parents=True, exist_ok=True)
  train.train_and_evaluate(tiny_config(data_dir), str(root / "workdir"))
  done.write_text("ok")
  return root / "workdir"


def run_data(workdir) -> str:
  """The prepared data dir the run was trained on."""
  from affectjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return str(workdir_lib.load_config(workdir).data.dir)
