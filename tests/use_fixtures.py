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


def override(config, **fields):
  """``config`` with dotted ``fields`` set: ``override(c, **{"data.cache": "none"})``."""
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def final_params(workdir):
  """(step, params and BatchNorm statistics as numpy) of the latest checkpoint.

  Read with Orbax alone, onto one device (the run may have had several
  processes), so the check does not lean on the trainer's own restore.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.join(ckpt_dir, str(step), "state")
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(path)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
        getattr(meta, "item_metadata", meta))
    tree = c.restore(path, target)
  return step, [np.asarray(x) for x in
                jax.tree.leaves({k: tree[k] for k in ("params", "rest")})]


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
