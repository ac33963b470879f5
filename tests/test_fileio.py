"""`affectjax.fileio`: whole files or none, and strict JSON."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from affectjax import fileio


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "sub" / "best.json"
  fileio.write_text(target, "old")  # Creates the parent directory.
  fileio.write_json(target, {"step": 3})
  assert json.loads(target.read_text()) == {"step": 3}
  assert [p.name for p in target.parent.iterdir()] == ["best.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  target = tmp_path / "report.html"
  target.write_text("old")

  def broken_rename(self, other):
    raise OSError("disk went away")

  monkeypatch.setattr(type(epath.Path(tmp_path)), "replace", broken_rename)
  with pytest.raises(OSError, match="disk went away"):
    fileio.write_text(target, "new")
  assert target.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_json_compatible_is_strict_json():
  value = {"nan": math.nan, "inf": np.float32(np.inf), "f": np.float32(0.5),
           "i": np.int64(3), "b": np.bool_(True), "cm": np.eye(2, dtype=int),
           "jax": jnp.asarray([1.0, jnp.nan]), "t": (1, (float("-inf"),)),
           "s": "val", "none": None}
  text = fileio.dumps(value)  # allow_nan=False: raises on any NaN left.
  assert json.loads(text) == {
      "nan": None, "inf": None, "f": 0.5, "i": 3, "b": True,
      "cm": [[1, 0], [0, 1]], "jax": [1.0, None], "t": [1, [None]],
      "s": "val", "none": None}
