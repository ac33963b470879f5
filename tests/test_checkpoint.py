"""Real Orbax checkpoints of a train-state-shaped pytree and a Grain iterator."""
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging as absl_logging

from affectjax import checkpoint as ckpt_lib


def _state(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = tx.init(params)
  # Take one real step so the moments are non-zero.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"step": jnp.asarray(7, jnp.int32), "params": params,
          "rest": {"mean": jnp.arange(4.0)}, "opt_state": opt_state}


def test_roundtrip_keeps_values_and_optax_types(tmp_path):
  state = _state(0)
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=2)
  c.save(7, state)
  c.wait()
  assert c.latest_step() == 7
  restored = c.restore(7, ckpt_lib.abstract_like(_state(1)))
  c.close()
  # Same tree structure, including optax's namedtuple states (not lists).
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert type(restored["opt_state"][1][0]).__name__ == type(
      state["opt_state"][1][0]).__name__
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_n_and_resumes_data_iterator(tmp_path):
  ds = grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset()
  it = iter(ds)
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=2)
  seen = []
  for step in range(1, 7):
    seen.append(next(it))
    if c.should_save(step, total_steps=6):
      c.save(step, _state(step), it)
  c.wait()
  assert c._manager.all_steps() == [4, 6]  # pylint: disable=protected-access
  expected_next = next(it)

  it2 = iter(ds)
  c2 = ckpt_lib.Checkpointer(str(tmp_path), every_steps=2, keep=2)
  c2.restore(c2.latest_step(), ckpt_lib.abstract_like(_state(0)), it2)
  np.testing.assert_array_equal(next(it2), expected_next)
  c.close()
  c2.close()


def test_should_save_schedule(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=5, keep=1)
  assert [s for s in range(1, 13) if c.should_save(s, 12)] == [5, 10, 12]
  c.close()


def test_keeps_best_besides_latest_and_records_it(tmp_path):
  """Orbax's BestN + LatestN: the best step survives after falling out of the latest N."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(tmp_path) / "ckpt"  # A Path object, not a str.
  c = ckpt_lib.Checkpointer(directory, every_steps=1, keep=2,
                            best_metric="macro_f1", best_mode="max")
  f1 = {1: 0.2, 2: 0.9, 3: 0.5, 4: float("nan"), 5: 0.4, 6: 0.1}
  for step, value in f1.items():
    metrics = {"macro_f1": value, "accuracy": 0.5,
               "confusion_matrix": [[1]]} if step != 5 else None
    c.save(step, _state(step), metrics=metrics, wait=(step == 3))
  c.wait()
  assert c.all_steps() == [2, 5, 6]
  assert c.best_step() == 2
  assert ckpt_lib.read_best_record(directory) == {
      "step": 2, "metric": "macro_f1", "mode": "max", "value": 0.9}
  c.close()
  # A fresh manager (another process: evaluate) finds the same best step.
  c2 = ckpt_lib.Checkpointer(str(directory), every_steps=1, keep=2,
                             best_metric="macro_f1", best_mode="max")
  assert c2.best_step() == 2
  assert c2.metrics(2)["accuracy"] == 0.5
  c2.close()


def test_best_mode_min_and_bad_metric_name(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1,
                            best_metric="loss", best_mode="min")
  for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
    c.save(step, _state(step), metrics={"loss": loss})
  c.wait()
  assert c.all_steps() == [2, 3] and c.best_step() == 2
  with pytest.raises(KeyError, match="best_metric='loss'"):
    c.save(4, _state(4), metrics={"accuracy": 1.0})
  c.close()
  with pytest.raises(ValueError, match="best_mode"):
    ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1,
                          best_metric="loss", best_mode="lowest")


def test_no_best_metric_means_no_best_step(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  c.save(1, _state(1), metrics={"macro_f1": 0.3}, wait=True)
  assert c.best_step() is None and c.latest_step() == 1
  c.close()


@pytest.mark.parametrize("mode,metric", [("max", "macro_f1"), ("min", "loss")])
def test_tied_evaluations_best_json_names_the_step_orbax_keeps(tmp_path, mode,
                                                               metric):
  """Two evaluations tie; later saves push one of them out of the latest 2,
  and Orbax deletes it. best.json (and best_step) must name the one it
  keeps: the later (BestN's stable sort), also while both are on disk."""
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2,
                            best_metric=metric, best_mode=mode)
  worse = 0.1 if mode == "max" else 0.9
  saves = {1: worse, 2: 0.5, 3: 0.5, 4: None, 5: None}
  for step, value in saves.items():
    c.save(step, _state(step),
           metrics=None if value is None else {metric: value})
  c.wait()
  assert c.all_steps() == [3, 4, 5]  # The latest 2, and the tie BestN kept.
  assert c.best_step() == 3
  assert ckpt_lib.read_best_record(tmp_path)["step"] == 3
  c.close()


class AbslWarnings(logging.Handler):
  """Collects the warnings logged through absl (Orbax's, affectjax's) while
  installed: ``with AbslWarnings() as w: ...; w.messages``."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    absl_logging.get_absl_logger().addHandler(self)
    return self

  def __exit__(self, *exc):
    absl_logging.get_absl_logger().removeHandler(self)


def test_save_without_metrics_logs_no_warning(tmp_path):
  """A periodic save (no evaluation) while best-keeping is on is normal."""
  with AbslWarnings() as warnings:
    c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2,
                              best_metric="macro_f1")
    c.save(1, _state(1))
    c.save(2, _state(2), metrics={"macro_f1": 0.3})
    c.save(3, _state(3), wait=True)
    c.close()
  assert warnings.messages == []
  assert c.metrics(2) == {"macro_f1": 0.3}  # Metrics are still saved.


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4)
              .to_iter_dataset())


def test_data_position_is_stored_once_with_the_global_batch(tmp_path):
  it = _iterator()
  for _ in range(3):
    next(it)
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=1,
                            global_batch_size=4)
  c.save(3, _state(3), it, wait=True)
  c.close()
  step_dir = tmp_path / "3"
  assert not (step_dir / "data").exists()  # No per-process files.
  position = json.loads((step_dir / ckpt_lib.POSITION / "metadata").read_text())
  assert position["iterator"] == {"next_index": 3}
  assert position["global_batch_size"] == 4

  # Another global batch: refused, naming the flag and both values.
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=1,
                            global_batch_size=8)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r"global batch of 4 \(--config.batch_size=4\), but "
                     r"this run has --config.batch_size=8"):
    c.restore(3, ckpt_lib.abstract_like(_state(0)), _iterator())
  # The state alone (evaluate, export) needs no data position check.
  c.restore(3, ckpt_lib.abstract_like(_state(0)))
  c.close()


def test_reads_checkpoints_with_per_process_grain_files(tmp_path):
  """Steps saved before the global position item: Grain's process files."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = _iterator()
  for _ in range(5):
    next(it)
  old = ocp.CheckpointManager(tmp_path, item_names=("state", "data"))
  old.save(5, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(5)),
      data=grain.checkpoint.CheckpointSave(it)))
  old.wait_until_finished()
  old.close()
  expected = next(it)
  assert os.listdir(tmp_path / "5" / "data").count("process_0-of-1.json") == 1

  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2,
                            global_batch_size=4)
  it2 = _iterator()
  state, step = c.restore_latest(ckpt_lib.abstract_like(_state(0)), it2)
  assert step == 5 and int(state["step"]) == 7
  np.testing.assert_array_equal(next(it2), expected)

  # Process files that disagree have no one global position: refused.
  data_dir = tmp_path / "5" / "data"
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  (data_dir / "process_1-of-2.json").write_text('{"next_index": 9}')
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r"different data positions.*process_0-of-2.json: "
                     r"\{'next_index': 5\}.*process_1-of-2.json: "
                     r"\{'next_index': 9\}"):
    c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  c.close()


def test_a_changed_model_stops_the_run_and_moves_nothing(tmp_path):
  """A changed model (here: another weight shape) is not damage: the run
  stops at the newest step, naming it, and every step stays where it is."""
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2)
  for step in (1, 2):
    c.save(step, _state(step), _iterator())
  c.wait()
  other = _state(0)
  other["params"]["w"] = jnp.zeros((5, 4))
  with pytest.raises(ckpt_lib.CheckpointReadError,
                     match=r"Could not read checkpoint step 2 in .*: "
                     r"ValueError: Requested shape.*stays where it is.*model "
                     r"or optimizer config changed"):
    c.restore_latest(ckpt_lib.abstract_like(other), _iterator())
  assert c.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  c.close()


def _damage(step_dir, how):
  """Real damage to a step's array files (those over 64 bytes)."""
  damaged = 0
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      path = os.path.join(root, f)
      size = os.path.getsize(path)
      if size <= 64 or f.startswith("_"):  # Orbax's JSON: a test of its own.
        continue
      if how == "removed":  # A file gone from a step that is there.
        os.remove(path)
        damaged += 1
        continue
      with open(path, "r+b") as fh:
        if how == "truncated":
          fh.truncate(size // 2)
        else:  # Every byte flipped: checksums and decoders reject it.
          data = fh.read()
          fh.seek(0)
          fh.write(bytes(b ^ 0xFF for b in data))
      damaged += 1
  assert damaged


@pytest.mark.parametrize("how", ["truncated", "flipped", "removed",
                                 "metadata", "array_metadata"])
def test_damaged_latest_step_is_moved_aside_and_the_one_before_restored(
    tmp_path, how):
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=3)
  for step in (1, 2):
    c.save(step, _state(step), _iterator())
  c.wait()
  if how == "metadata":  # Orbax's tree metadata cut short: not JSON.
    (tmp_path / "2" / "state" / "_METADATA").write_text('{"tree_meta')
  elif how == "array_metadata":  # Flipped bytes in a JSON file: not text.
    # ("flipped" damages it too, but which file fails first is a race.)
    path = tmp_path / "2" / "state" / "array_metadatas" / "process_0"
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
  else:
    _damage(tmp_path / "2", how)
  with AbslWarnings() as warnings:
    state, step = c.restore_latest(ckpt_lib.abstract_like(_state(0)),
                                   _iterator())
  assert step == 1
  assert any(m.startswith(f"Checkpoint step 2 in {tmp_path} cannot be read")
             for m in warnings.messages), warnings.messages
  assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]  # Kept.
  assert c.all_steps() == [1]
  c.close()


class _TransientRead:
  """Makes tensorstore's reads fail as a storage that does not answer."""

  def __init__(self, monkeypatch, error):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    self.calls = 0

    def fail(*args, **kwargs):
      self.calls += 1
      raise error

    monkeypatch.setattr(ts, "open", fail)


@pytest.mark.parametrize("error", [
    TimeoutError("storage timed out"),
    ConnectionError("connection reset by peer"),
    ValueError("UNAVAILABLE: Error reading gs://b/run/2/state/d/x: 503"),
    ValueError("DEADLINE_EXCEEDED: Error reading gs://b/run/2/state/d/x"),
    ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB"),
    ValueError("PERMISSION_DENIED: Error reading gs://b/run/2/state"),
], ids=lambda e: str(e).split(":")[0][:24])
def test_a_transient_read_error_stops_the_run_and_moves_nothing(
    tmp_path, monkeypatch, error):
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=3)
  for step in (1, 2):
    c.save(step, _state(step), _iterator())
  c.close()
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=3)
  reads = _TransientRead(monkeypatch, error)
  with pytest.raises(ckpt_lib.CheckpointReadError,
                     match=r"Could not read checkpoint step 2 .* not a sign "
                     r"of damaged files, so every step stays where it is"):
    c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  assert reads.calls  # The fault was on the read path.
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  monkeypatch.undo()
  _, step = c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  assert step == 2  # Once the storage answers, the same step is read.
  c.close()


class _Vanish:
  """Takes ``path`` away (renamed aside, as an unmounted file system or a
  removed directory looks to a reader) at tensorstore's first open, that is
  while a step's arrays are being read; ``back``: returns it as soon as that
  open has failed (a mount that flapped). ``restore()`` puts it back."""

  def __init__(self, monkeypatch, path, back=False):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    self.path, self.away = str(path), f"{path}.away"
    self.taken = False
    real_open = ts.open

    def open_(*args, **kwargs):
      if self.taken or not os.path.exists(self.path):
        return real_open(*args, **kwargs)
      self.taken = True
      os.rename(self.path, self.away)
      opened = real_open(*args, **kwargs)
      if back:
        try:
          opened.exception()  # Waits for the open to end (here: fail).
        finally:
          os.rename(self.away, self.path)
      return opened

    monkeypatch.setattr(ts, "open", open_)

  def restore(self):
    if os.path.exists(self.away):
      os.rename(self.away, self.path)


@pytest.mark.parametrize("where", ["checkpoints", "step", "files_back"])
def test_a_step_not_there_is_not_damage(tmp_path, monkeypatch, where):
  """A checkpoint directory (a file system not mounted) or a step directory
  that is not there while a step is read, or files missing for a moment
  (a mount that flapped), say nothing about the step's bytes: the run stops
  (exit 1) naming what is missing, and every step stays where it is. (A
  file missing inside a step that is there is damage: ``removed`` above.)"""
  from affectjax import cli  # pylint: disable=g-import-not-at-top
  ckpt = tmp_path / "ckpt"
  c = ckpt_lib.Checkpointer(ckpt, every_steps=1, keep=3)
  for step in (1, 2):
    c.save(step, _state(step), _iterator())
  c.close()
  c = ckpt_lib.Checkpointer(ckpt, every_steps=1, keep=3)  # Lists 1 and 2.
  if where == "checkpoints":
    gone = _Vanish(monkeypatch, ckpt)
    expected = rf"{ckpt} is not there \(is its file system mounted\?\)"
  elif where == "step":  # Removed after the listing (another run's cleanup).
    gone = _Vanish(monkeypatch, ckpt / "2")
    gone.restore = lambda: None
    os.rename(ckpt / "2", ckpt / "2.away")
    gone.restore = lambda: os.rename(ckpt / "2.away", ckpt / "2")
    expected = rf"its directory {ckpt}/2 is not there"
  else:
    gone = _Vanish(monkeypatch, ckpt / "2" / "state" / "d", back=True)
    expected = (rf"{ckpt}/2/state/d/\w+ was not found while reading, and is "
                "there now")
  with AbslWarnings() as warnings:
    with pytest.raises(ckpt_lib.CheckpointReadError,
                       match=rf"^Could not read checkpoint step 2 in {ckpt}: "
                       rf"{expected}.* not a sign of damaged files, so every "
                       "step stays where it is") as raised:
      c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  assert cli.exit_status(raised.value) == 1
  assert not [m for m in warnings.messages if "falling back" in m], (
      warnings.messages)
  gone.restore()
  monkeypatch.undo()
  assert sorted(os.listdir(ckpt)) == ["1", "2"]  # Nothing set aside.
  _, step = c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  assert step == 2  # Once it is back, the same step is read.
  c.close()


@pytest.mark.parametrize("error, bad", [
    (ValueError("DATA_LOSS: Error reading ...: CRC-32C checksum verification "
                "failed"), True),
    (ValueError("OUT_OF_RANGE: Error reading ...: Requested byte range [0, "
                "273) is not valid for value of size 10"), True),
    (ValueError("NOT_FOUND: Error reading ... local file .../d/56853d"), True),
    (ValueError('Error reading "w/.zarray": Error decoding b-tree node: '
                "ZSTD_decompressStream() failed: Data corruption detected"),
     True),
    (json.JSONDecodeError("Unterminated string", '{"tree', 1), True),
    (UnicodeDecodeError("utf-8", b"\x84", 0, 1, "invalid start byte"), True),
    (KeyError('Item "state" was not found in the checkpoint.'), True),
    (ckpt_lib.UnreadableCheckpointError("holds no data position"), True),
    (ValueError("UNAVAILABLE: 503 Service Unavailable"), False),
    (ValueError("Requested shape: (5, 4) is not compatible with the stored "
                "shape: (3, 4)."), False),
    (TimeoutError("timed out"), False),
    (FileNotFoundError("gone"), False),
    (MemoryError(), False),
    (KeyError("params"), False),
    (AttributeError("'int' object has no attribute 'items'"), False),
])
def test_which_errors_mean_the_bytes_are_bad(error, bad):
  assert ckpt_lib.bytes_are_bad(error) is bad


def test_a_damaged_step_that_cannot_be_moved_aside_is_never_deleted(
    tmp_path, monkeypatch):
  """Storage without directory renames: the run stops and says so."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=3)
  for step in (1, 2):
    c.save(step, _state(step), _iterator())
  c.wait()
  _damage(tmp_path / "2", "truncated")

  def no_rename(self, target):
    raise OSError(95, "Operation not supported", str(self))

  monkeypatch.setattr(type(epath.Path(tmp_path)), "rename", no_rename)
  with pytest.raises(ckpt_lib.CheckpointReadError,
                     match=r"step 2 in .* is damaged and could not be moved "
                     r"aside to .*2.corrupt.*move or copy it away yourself"):
    c.restore_latest(ckpt_lib.abstract_like(_state(0)), _iterator())
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  c.close()


def test_orbax_internals_are_where_affectjax_expects_them():
  """Fails loudly when an Orbax upgrade moves the private pieces
  affectjax.orbax_internals uses (setup.cfg pins the tested series)."""
  from affectjax import orbax_internals  # pylint: disable=g-import-not-at-top
  orbax_internals.check()
  assert isinstance(orbax_internals.current_operation_id(), str)


def test_moved_orbax_internals_never_fail_a_good_save(tmp_path, monkeypatch):
  from affectjax import orbax_internals  # pylint: disable=g-import-not-at-top

  def moved():
    raise ImportError("No module named 'orbax.checkpoint._src.futures'")

  monkeypatch.setattr(orbax_internals, "_modules", moved)
  with pytest.raises(ImportError):
    orbax_internals.check()
  with AbslWarnings() as warnings:
    c = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2)
    c.save(1, _state(1))
    c.save(2, _state(2), wait=True)
    c.close()
  assert c.all_steps() == [1, 2]
  assert [m for m in warnings.messages if "Orbax internals changed" in m]
