"""Host input path over real prepared ArrayRecord data: batches, global order, resume."""
import numpy as np
import pytest
import simplejpeg

from affectjax import batch_loaders, data, input_pipeline, sampling
from configs import custom_cnn
from tests import use_fixtures


def _config(data_dir, **overrides):
  c = custom_cnn.get_config("tiny")
  c.data.dir = data_dir
  return use_fixtures.override(c, **overrides)


def _take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _cat(per_process, key):
  """Concatenates process slices of each global batch, as the mesh does."""
  return [np.concatenate([p[b][key] for p in per_process])
          for b in range(len(per_process[0]))]


def test_train_batches_hold_the_stored_images_in_seeded_order(
    synthetic_arrayrecord):
  src = data.source(synthetic_arrayrecord, "train")
  stored = src.image_size
  c = _config(synthetic_arrayrecord)  # image_size 16 < 2 * 24: no DCT scaling.
  batches = _take(input_pipeline.train_dataset(c, local_batch_size=8), 2)
  b = batches[0]
  assert b["image"].shape == (8, stored, stored, 3)
  assert b["image"].dtype == np.uint8 and b["expression"].dtype == np.int32
  assert b["valence"].dtype == np.float32 and b["arousal"].dtype == np.float32
  assert set(b) == {"image", "expression", "valence", "arousal"}
  order = sampling.ShuffleOrder(len(src), c.seed)
  for k, batch in enumerate(batches):
    for row, i in enumerate(order.indices(8 * k, 8 * k + 8)):
      ex = src[int(i)]
      np.testing.assert_array_equal(batch["image"][row], ex["image"])
      assert batch["expression"][row] == ex["expression"]
      assert batch["valence"][row] == ex["valence"]
      assert batch["arousal"][row] == ex["arousal"]
  # Every epoch is a permutation of the split; epochs and seeds differ.
  n = len(src)
  e0, e1 = order.indices(0, n), order.indices(n, 2 * n)
  assert sorted(e0) == sorted(e1) == list(range(n))
  assert not np.array_equal(e0, e1)
  assert not np.array_equal(
      e0, sampling.ShuffleOrder(n, c.seed + 1).indices(0, n))


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_global_batch_is_the_same_for_any_processes_and_threads(
    synthetic_arrayrecord, sampler):
  c1 = _config(synthetic_arrayrecord, **{"data.sampler": sampler,
                                         "data.num_workers": 1})
  c3 = _config(synthetic_arrayrecord, **{"data.sampler": sampler,
                                         "data.num_workers": 3})
  n = len(data.source(synthetic_arrayrecord, "train"))
  # Start near the end of the first epoch: batches 19 and 20 of 8 straddle it.
  start = {"next_index": n // 8 - 1}
  single = _take(input_pipeline.train_dataset(c1, local_batch_size=8), 3,
                 start)
  split = [_take(input_pipeline.train_dataset(
      c3, local_batch_size=4, process_index=p, process_count=2), 3, start)
           for p in range(2)]
  for key in ("image", "expression", "valence"):
    for a, b in zip(_cat([single], key), _cat(split, key)):
      np.testing.assert_array_equal(a, b)


def test_device_prefetch_resumes_through_an_orbax_checkpoint(
    synthetic_arrayrecord, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from affectjax import checkpoint, device_prefetch, sharding  # pylint: disable=g-import-not-at-top
  c = _config(synthetic_arrayrecord, **{"data.sampler": "balanced",
                                        "data.num_workers": 2})
  mesh = sharding.make_mesh()
  state = {"x": jax.numpy.zeros((2,))}

  def stream():
    return device_prefetch.DevicePrefetch(
        iter(input_pipeline.train_dataset(c, local_batch_size=8)), mesh)

  it = stream()
  first = [next(it) for _ in range(3)]
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1,
                                 async_save=False)
  ckpt.save(3, state, it)  # One batch is already on the device, not consumed.
  uninterrupted = [jax.device_get(next(it)) for _ in range(3)]
  assert it.wait_seconds > 0
  it.close()
  ckpt.close()
  assert first[0]["image"].sharding == sharding.batch_sharding(mesh)
  assert first[0]["image"].shape == (8, 24, 24, 3)

  resumed = stream()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1)
  ckpt.restore(3, checkpoint.abstract_like(state), resumed)
  ckpt.close()
  for a in uninterrupted:
    b = jax.device_get(next(resumed))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  resumed.close()


def test_balanced_sampler_frequencies_and_class_cycles():
  labels = np.repeat(np.arange(8), [400, 40, 10, 1, 0, 30, 20, 99])
  present = np.array([0, 1, 2, 3, 5, 6, 7])
  counts = np.bincount(labels, minlength=8)[present]
  n = 40_000
  for temperature in (0.0, 0.5, 1.0):
    order = sampling.BalancedOrder(labels, seed=3,
                                         temperature=temperature,
                                         num_classes=8, block_size=4096)
    idx = order.indices(0, n)
    freq = np.bincount(labels[idx], minlength=8)[present] / n
    want = counts ** temperature / (counts ** temperature).sum()
    np.testing.assert_allclose(freq, want, atol=0.012)
    # Random access agrees with a sequential walk (block edges included).
    np.testing.assert_array_equal(order.indices(4000, 9000), idx[4000:9000])
  # Within a class, a pass shows every member once before any repeats.
  drawn = labels[idx]
  for c in present:
    seq = idx[drawn == c]
    members = np.flatnonzero(labels == c)
    for r in range(len(seq) // len(members)):
      assert sorted(seq[r * len(members):(r + 1) * len(members)]) == \
          members.tolist()
  # A fresh object with the same seed, reached out of order, agrees.
  again = sampling.BalancedOrder(labels, seed=3, temperature=1.0,
                                       num_classes=8, block_size=4096)
  np.testing.assert_array_equal(again.indices(30_000, 30_100), idx[30_000:30_100])
  with pytest.raises(ValueError, match="num_classes"):
    sampling.BalancedOrder(labels, seed=0, temperature=0, num_classes=7)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_padding(synthetic_arrayrecord,
                                                     process_count):
  c = _config(synthetic_arrayrecord, **{"data.num_workers": process_count})
  src = data.source(synthetic_arrayrecord, "val")
  n = len(src)
  global_batch = 16
  assert n % global_batch  # The fixture must exercise padding.
  per_process = []
  for p in range(process_count):
    ds, n_ds = input_pipeline.eval_dataset(
        c, local_batch_size=global_batch // process_count, process_index=p,
        process_count=process_count)
    assert n_ds == n
    per_process.append(list(input_pipeline.iterate(ds)))
  assert len(per_process[0]) == -(-n // global_batch)
  index = np.concatenate(_cat(per_process, "index"))
  mask = np.concatenate(_cat(per_process, "mask"))
  np.testing.assert_array_equal(index[:n], np.arange(n))
  assert (index[n:] == -1).all()
  assert mask[:n].all() and not mask[n:].any()
  assert per_process[0][0]["mask"].dtype == np.float32
  assert per_process[0][0]["index"].dtype == np.int32
  expr = np.concatenate(_cat(per_process, "expression"))[:n]
  np.testing.assert_array_equal(expr, [src[i]["expression"] for i in range(n)])
  images = np.concatenate(_cat(per_process, "image"))
  np.testing.assert_array_equal(images[n - 1], src[n - 1]["image"])


def test_dct_scaled_decode_when_stored_images_are_twice_the_size(
    synthetic_arrayrecord):
  manifest = data.read_manifest(synthetic_arrayrecord)
  assert manifest["image_size"] == 24
  c = _config(synthetic_arrayrecord, image_size=12)
  assert batch_loaders.host_image_size(c, manifest) == 12  # 1/2 scale.
  c.image_size = 6
  assert batch_loaders.host_image_size(c, manifest) == 6  # 1/4 scale.
  c.image_size = 13
  assert batch_loaders.host_image_size(c, manifest) == 24  # 1/2 too small.
  assert batch_loaders.host_image_size(
      c, {**manifest, "encoding": "raw"}) == 24
  c.image_size = 10
  ds, _ = input_pipeline.eval_dataset(c, local_batch_size=4)
  b = next(iter(ds))
  assert b["image"].shape == (4, 12, 12, 3)
  src = data.source(synthetic_arrayrecord, "val")
  raw = data.decode_record(src.read_records([0])[0], decode_image=False)
  full = simplejpeg.decode_jpeg(raw["image"], colorspace="RGB")
  # libjpeg's 1/2 DCT scaling approximates a 2x2 box filter of the full decode.
  box = full.reshape(12, 2, 12, 2, 3).astype(np.float32).mean(axis=(1, 3))
  assert np.abs(b["image"][0] - box).mean() < 4.0


def test_bad_inputs_fail_with_actionable_errors(synthetic_arrayrecord):
  c = _config(synthetic_arrayrecord)
  with pytest.raises(ValueError, match="config.batch_size"):
    input_pipeline.train_dataset(c, local_batch_size=10_000)
  c.data.sampler = "uniform"
  with pytest.raises(ValueError, match="data.sampler"):
    input_pipeline.train_dataset(c, local_batch_size=8)
  # A stored image of the wrong size names the record and the fix.
  decoder = batch_loaders._Decoder("jpeg", 24, 24, "train")  # pylint: disable=protected-access
  small = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="Record 7 of the 'train' split"):
    decoder.into(small, np.empty((24, 24, 3), np.uint8), 7)


_CHILD = r"""
import sys, time
from affectjax import data, input_pipeline
from configs import custom_cnn
c = custom_cnn.get_config("tiny")
c.data.dir = sys.argv[1]
c.data.num_workers = 2
ds, _ = input_pipeline.eval_dataset(c, local_batch_size=8)
assert len(list(input_pipeline.iterate(ds))) > 0
data.source(c.data.dir, "train")[0]
it = iter(input_pipeline.train_dataset(c, local_batch_size=8))
next(it)
print("tfds imported:", "tensorflow_datasets" in sys.modules, flush=True)
while True:  # A trainer busy reading batches when it is killed.
  next(it)
"""


def test_no_tfds_no_worker_processes_nothing_left_after_sigkill(
    synthetic_arrayrecord):
  """Issue 7: the trainer's input path imports no tensorflow_datasets, and
  decodes in threads: a trainer killed with SIGKILL leaves no process and no
  shared memory behind."""
  import os, signal, subprocess, sys, time  # pylint: disable=g-import-not-at-top,multiple-imports
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, synthetic_arrayrecord],
                          cwd=repo, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": repo})
  try:
    line = proc.stdout.readline()
    assert line.strip() == "tfds imported: False", line
    time.sleep(0.5)
    children = []
    for task in os.listdir(f"/proc/{proc.pid}/task"):
      with open(f"/proc/{proc.pid}/task/{task}/children") as f:
        children += f.read().split()
    assert children == []  # Threads only.
    with open(f"/proc/{proc.pid}/maps") as f:
      assert "/dev/shm/" not in f.read()  # No shared-memory batches.
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_batch_buffers_are_reused_only_when_nothing_refers_to_them():
  """Batch image buffers come back only once no batch, view or aliasing
  array holds them (a reused buffer still in use would change its pixels)."""
  buffers = batch_loaders._ImageBuffers((2, 4, 4, 3))  # pylint: disable=protected-access
  a = buffers.get()
  b = buffers.get()
  assert a.ctypes.data != b.ctypes.data
  address = a.ctypes.data
  view = a[1:]  # A view (its base is `a`) keeps the buffer in use...
  del a
  c = buffers.get()
  assert c.ctypes.data not in (address, b.ctypes.data)
  del view  # ...until it goes.
  assert buffers.get().ctypes.data == address


def test_a_batch_buffer_a_jax_array_still_uses_is_not_handed_out():
  """On a CPU device, `device_put` and `make_array_from_process_local_data`
  use a suitably aligned batch buffer in place: the jax.Array is then the
  buffer's only holder, and the pool must not hand the buffer out (a new
  batch written into it would change the array)."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from affectjax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  puts = {"device_put": lambda b: jax.device_put(b, jax.devices()[0]),
          "make_array_from_process_local_data":
              lambda b: sharding.shard_batch({"image": b}, mesh)["image"]}
  for name, put in puts.items():
    buffers = batch_loaders._ImageBuffers((8, 16, 16, 3))  # pylint: disable=protected-access
    held = [buffers.get() for _ in range(64)]
    # XLA's CPU client uses host memory in place when 64-byte aligned.
    buf = next((b for b in held if b.ctypes.data % 64 == 0), None)
    assert buf is not None, "no 64-byte aligned buffer among 64"
    del held
    address = buf.ctypes.data
    buf[:] = 7
    x = put(buf)
    x.block_until_ready()
    del buf
    gc.collect()
    # The array's memory is the buffer's (so a reuse would overwrite it).
    assert x.addressable_shards[0].data.unsafe_buffer_pointer() == address
    handed = [buffers.get() for _ in range(40)]
    assert address not in [b.ctypes.data for b in handed], name
    for b in handed:
      b[:] = 0
    assert (np.asarray(x) == 7).all(), name
    del handed, x
    gc.collect()
    again = [buffers.get() for _ in range(40)]  # Once it is gone, it is.
    assert address in [b.ctypes.data for b in again], name
