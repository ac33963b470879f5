"""Grain pipelines over a real prepared ArrayRecord dataset."""
import numpy as np
import pytest

from affectjax import data, input_pipeline
from configs import custom_cnn


def _config(data_dir, **overrides):
  c = custom_cnn.get_config("tiny")
  c.data.dir = data_dir
  for k, v in overrides.items():
    node, *rest = k.split(".")
    if rest:
      setattr(getattr(c, node), rest[0], v)
    else:
      setattr(c, k, v)
  return c


def _take(ds, n):
  out = []
  for i, b in enumerate(input_pipeline.iterate(ds)):
    if i == n:
      break
    out.append(b)
  return out


def test_train_batches_are_uint8_and_deterministic(synthetic_arrayrecord):
  c = _config(synthetic_arrayrecord)
  a = _take(input_pipeline.train_dataset(c, local_batch_size=8), 3)
  b = _take(input_pipeline.train_dataset(c, local_batch_size=8), 3)
  assert a[0]["image"].shape == (8, c.image_size, c.image_size, 3)
  assert a[0]["image"].dtype == np.uint8
  assert a[0]["expression"].dtype == np.int32
  assert a[0]["valence"].dtype == np.float32
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # A different seed gives a different order.
  c2 = _config(synthetic_arrayrecord, seed=1)
  d = _take(input_pipeline.train_dataset(c2, local_batch_size=8), 1)
  assert not np.array_equal(a[0]["expression"], d[0]["expression"]) or not \
      np.array_equal(a[0]["image"], d[0]["image"])


def test_worker_processes_give_the_same_stream(synthetic_arrayrecord):
  c0 = _config(synthetic_arrayrecord)
  c2 = _config(synthetic_arrayrecord)
  c2.data.num_workers = 2
  a = _take(input_pipeline.train_dataset(c0, local_batch_size=8), 4)
  b = _take(input_pipeline.train_dataset(c2, local_batch_size=8), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["valence"], y["valence"])


def test_processes_get_disjoint_shards_of_an_epoch(synthetic_arrayrecord):
  src = data.source(synthetic_arrayrecord, "train")
  n = len(src)
  size = src[0]["image"].shape[0]
  # No augmentation at the stored size: batches hold the stored images.
  c = _config(synthetic_arrayrecord, image_size=size)
  c.augment.flip = False
  c.augment.crop_scale = (1.0, 1.0)
  c.augment.aspect_ratio = (1.0, 1.0)
  per_process = n // 2 // 4  # Whole local batches covering one epoch.
  seen = []
  for p in range(2):
    ds = input_pipeline.train_dataset(c, local_batch_size=4, process_index=p,
                                      process_count=2)
    for b in _take(ds, per_process):
      seen.extend(img.tobytes() for img in b["image"])
  everything = {src[i]["image"].tobytes() for i in range(n)}
  assert len(everything) == n  # Synthetic faces are unique.
  assert len(seen) == len(set(seen)) == per_process * 8
  assert set(seen) <= everything


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_padding(synthetic_arrayrecord,
                                                     process_count):
  c = _config(synthetic_arrayrecord)
  c.data.eval_num_workers = process_count - 1  # Also cover worker processes.
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
  num_batches = len(per_process[0])
  assert num_batches == -(-n // global_batch)
  # Reassemble global batches in process order, as the mesh does.
  index = np.concatenate([
      np.concatenate([per_process[p][b]["index"] for p in range(process_count)])
      for b in range(num_batches)])
  mask = np.concatenate([
      np.concatenate([per_process[p][b]["mask"] for p in range(process_count)])
      for b in range(num_batches)])
  np.testing.assert_array_equal(index[:n], np.arange(n))
  assert mask[:n].all() and not mask[n:].any()
  expr = np.concatenate([
      np.concatenate([per_process[p][b]["expression"]
                      for p in range(process_count)])
      for b in range(num_batches)])[:n]
  np.testing.assert_array_equal(expr, [src[i]["expression"] for i in range(n)])


def test_too_small_split_names_the_flag(synthetic_arrayrecord):
  c = _config(synthetic_arrayrecord)
  with pytest.raises(ValueError, match="config.batch_size"):
    input_pipeline.train_dataset(c, local_batch_size=10_000)
