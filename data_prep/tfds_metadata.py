"""tensorflow-datasets metadata next to the shards, so tfds can read them.

Writes `dataset_info.json` and `features.json` (plus the ClassLabel names
file) describing exactly the Example layout `affectjax.data.encode_record`
produces. Then, without TensorFlow:

    tfds.data_source(builder=tfds.builder_from_directory(OUT))['train'][0]

tfds' own metadata writers are used (not hand-written JSON) so the files stay
in step with the installed tfds version. They are written into a temporary
folder and renamed into place, like every other output of data_prep.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np

from affectjax import data as affect_data


def features(image_size: int, encoding: str, num_classes: int):
  """The tfds FeaturesDict matching `affectjax.data.encode_record`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shape = (image_size, image_size, 3)
  if encoding == "jpeg":
    image = tfds.features.Image(shape=shape, encoding_format="jpeg")
  else:
    # Raw pixels as one bytes value (not 37k int64s): Tensor's BYTES encoding.
    image = tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                 encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict({
      "image": image,
      "expression": tfds.features.ClassLabel(
          names=list(affect_data.label_names(num_classes))),
      "valence": tfds.features.Scalar(dtype=np.float32),
      "arousal": tfds.features.Scalar(dtype=np.float32),
      "landmarks": tfds.features.Tensor(
          shape=(affect_data.NUM_LANDMARKS, 2), dtype=np.float32),
      "path": tfds.features.Text(),
  })


def write(output_dir: str, *, image_size: int, encoding: str, num_classes: int,
          splits: Mapping[str, Sequence[tuple[int, int]]],
          description: str, version: str = "1.0.0") -> list[str]:
  """Writes the tfds metadata files; returns their names.

  Args:
    output_dir: the dataset directory holding the shards.
    splits: split -> [(num_examples, num_bytes) per shard, in shard order].
    description: free text shown by tfds.
  """
  from tensorflow_datasets.core import dataset_info  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import splits as splits_lib  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import utils  # pylint: disable=g-import-not-at-top

  template = naming.ShardedFileTemplate(
      data_dir=output_dir, template=naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=affect_data.DATASET_NAME,
      filetype_suffix=affect_data.FILE_FORMAT)
  info = dataset_info.DatasetInfo(
      builder=dataset_info.DatasetIdentity(
          name=affect_data.DATASET_NAME, version=utils.Version(version),
          data_dir=output_dir, module_name=""),
      description=description,
      features=features(image_size, encoding, num_classes),
      homepage="http://mohammadmahoor.com/affectnet/",
  )
  info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.set_splits(splits_lib.SplitDict([
      splits_lib.SplitInfo(
          name=name, shard_lengths=[int(n) for n, _ in shards],
          num_bytes=int(sum(b for _, b in shards)),
          filename_template=template.replace(split=name))
      for name, shards in splits.items()]))
  tmp = tempfile.mkdtemp(prefix=".tfds_meta.tmp-", dir=output_dir)
  try:
    info.write_to_directory(tmp)
    names = sorted(os.listdir(tmp))
    for name in names:
      os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return names
