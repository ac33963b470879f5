"""A run's input/output contract: what its model takes and gives, kept in the run.

The trainer writes ``W/run_contract.json`` at start (process 0; temporary
name, then rename), from its config and the prepared data's manifest:

  input          prepared_size (the side data_prep stored faces at: what
                 predict and export feed), host_size (the side training
                 decodes stored faces to), model_size (``config.image_size``,
                 resized to on the device), the stored encoding, and the
                 face-crop margin data_prep used;
  normalization  the model's own preprocessing (mean/std or Keras mode), as
                 measured on the model family's preprocess function;
  classes        count, names, the loss's weighting and class weights;
  data           the data dir and its fingerprint (a sha256 over the
                 manifest's shard checksums), to tell which data it was;
  valence_arousal  (optional) how many training examples had valence and
                 arousal, and whether the run learned each (``learned``: it
                 had examples and a non-zero loss weight); a fine-tune
                 carries a head column only where the source learned it.
                 Absent in runs from before it was recorded;
  init_from      (optional) where a fine-tuned run started: the source
                 workdir, checkpoint and step, whether EMA weights were
                 taken, the source's data fingerprint and a sha256 of the
                 weights taken, and which classes and valence/arousal
                 columns were carried (see ``affectjax.init_from``).

The two optional keys keep ``version`` 1: a reader that does not know them
ignores them.

evaluate, predict and export read it through ``workdir.open_run`` (``Run.
contract``), so a run serves and exports the same wherever it is copied, and
without its data dir; only evaluating a split needs data. A run trained
before runs carried a contract still opens: ``load`` infers one from the
config and, where it still exists, the data dir's manifest, and logs one
note saying what was inferred from where.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from affectjax import batch_loaders
from affectjax import data
from affectjax import fileio
from affectjax import train_state

FILE_NAME = "run_contract.json"
VERSION = 1
# data_prep's default --margin: assumed only for a run that predates the
# contract and whose data dir (whose manifest records the margin) is gone.
_LEGACY_MARGIN = 0.1


@dataclasses.dataclass(frozen=True)
class Contract:
  """Everything the model's input and output depend on (see the module doc)."""
  prepared_size: int
  host_size: int
  model_size: int
  encoding: str
  margin: float
  class_names: tuple[str, ...]
  class_weighting: str
  class_weights: tuple[float, ...] | None
  normalization: dict
  data_dir: str
  data_fingerprint: str | None
  # What ``load`` had to infer for a run without the file (empty otherwise).
  inferred: tuple[str, ...] = ()
  # Optional records (see the module doc); None when absent.
  valence_arousal: dict | None = None
  init_from: dict | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def class_weights_array(self) -> np.ndarray | None:
    if self.class_weights is None:
      return None
    return np.asarray(self.class_weights, np.float32)

  def learned_valence_arousal(self) -> tuple[bool, bool] | None:
    """(valence, arousal): whether the run learned each; None when the run
    does not record it (it predates the record)."""
    if self.valence_arousal is None:
      return None
    learned = self.valence_arousal["learned"]
    return bool(learned["valence"]), bool(learned["arousal"])

  def to_json(self) -> dict[str, Any]:
    optional = {k: v for k, v in (("valence_arousal", self.valence_arousal),
                                  ("init_from", self.init_from))
                if v is not None}
    return {
        "version": VERSION,
        "input": {"prepared_size": self.prepared_size,
                  "host_size": self.host_size,
                  "model_size": self.model_size,
                  "encoding": self.encoding,
                  "crop_margin": self.margin,
                  "layout": "NHWC, RGB, uint8 0..255"},
        "normalization": self.normalization,
        "classes": {"count": self.num_classes,
                    "names": list(self.class_names),
                    "weighting": self.class_weighting,
                    "weights": (None if self.class_weights is None else
                                list(self.class_weights))},
        "data": {"dir": self.data_dir,
                 "fingerprint": self.data_fingerprint},
        **optional,
    }

  @classmethod
  def from_json(cls, obj: dict[str, Any], where) -> "Contract":
    if obj.get("version") != VERSION:
      raise ValueError(f"{where}: contract version {obj.get('version')!r}, "
                       f"this affectjax reads version {VERSION}; use the "
                       "affectjax release that trained the run.")
    try:
      inp, cls_, dat = obj["input"], obj["classes"], obj["data"]
      weights = cls_["weights"]
      return cls(
          prepared_size=int(inp["prepared_size"]),
          host_size=int(inp["host_size"]),
          model_size=int(inp["model_size"]), encoding=str(inp["encoding"]),
          margin=float(inp["crop_margin"]),
          class_names=tuple(cls_["names"]),
          class_weighting=str(cls_["weighting"]),
          class_weights=None if weights is None else tuple(
              float(w) for w in weights),
          normalization=dict(obj["normalization"]),
          data_dir=str(dat["dir"]), data_fingerprint=dat["fingerprint"],
          valence_arousal=_checked_va(obj.get("valence_arousal")),
          init_from=obj.get("init_from"))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where} is not a run contract ({e!r}); delete it to "
                       "have it inferred from config.json and the data dir's "
                       "manifest.") from e


def _checked_va(record: dict | None) -> dict | None:
  """The valence/arousal record, checked for the keys readers use."""
  if record is not None:
    _ = bool(record["learned"]["valence"]), bool(record["learned"]["arousal"])
  return record


# --------------------------------------------------------------------------
# Building one.
# --------------------------------------------------------------------------
def fingerprint(manifest: dict) -> str:
  """sha256 over every split's shard checksums (file name, size, sha256)."""
  splits = {name: [(s["file"], s["num_bytes"], s["sha256"])
                   for s in info.get("shards", ())]
            for name, info in sorted(manifest["splits"].items())}
  return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()
                        ).hexdigest()


def normalization(model_name: str) -> dict[str, Any]:
  """The model family's input normalization, measured on its preprocess.

  Probing the function itself (one black and three single-channel images)
  keeps this true for any model without a second table of constants: a
  per-channel affine map is reported as mean/std on the 0..1 scale (Keras
  'torch' mode), a channel swap with offsets as Keras 'caffe' mode.
  Normalization a model keeps in its weights (EfficientNet's stem layers)
  travels in the checkpoint; this records its initial values.
  """
  from affectjax import models  # pylint: disable=g-import-not-at-top
  probe = np.zeros((4, 1, 1, 3), np.float32)
  for k in range(3):
    probe[k + 1, 0, 0, k] = 255.0
  out = np.asarray(jax.device_get(models.preprocess(model_name, probe)),
                   np.float64)[:, 0, 0, :]
  bias, gain = out[0], (out[1:] - out[0]) / 255.0  # gain[input, output].
  r = lambda a: [round(float(v), 4) for v in a]
  if np.allclose(gain, np.diag(np.diag(gain)), atol=1e-6):
    std = 1.0 / (255.0 * np.diag(gain))
    return {"mode": "torch", "formula": "(x / 255 - mean) / std, RGB",
            "mean": r(-bias * std), "std": r(std)}
  if np.allclose(gain, np.eye(3)[::-1], atol=1e-6):
    return {"mode": "caffe", "formula": "x[..., ::-1] - mean_bgr (RGB -> BGR)",
            "mean_bgr": r(-bias)}
  return {"mode": "affine", "formula": "x @ gain + bias (x: RGB 0..255)",
          "gain": [r(row) for row in gain], "bias": r(bias)}


def class_names(config, manifest: dict) -> tuple[str, ...]:
  """The run's class names in id order: the manifest's ``label_names``, or
  AffectNet's for ``config.num_classes`` (manifests without the names)."""
  names = manifest.get("label_names") or ()
  if len(names) != int(config.num_classes):
    names = data.label_names(int(config.num_classes))
  return tuple(str(n) for n in names)


def valence_arousal_record(config, manifest: dict,
                           previous: dict | None = None) -> dict:
  """How many training examples of ``config.data.dir`` have valence and
  arousal, and whether training on them with ``config.loss`` learns each.

  Reads every record of the train split once (labels only, nothing
  decoded): a second or two for FER2013's 28,709 faces, and the trainer
  does it once per run (a resume keeps the record; see ``write``).
  ``learned`` is true for a target with at least one example and a
  non-zero weight in the loss (its weight times MSE plus CCC weights).
  ``previous``: a record of the same data, whose counts are reused.
  """
  if previous is not None:
    total = int(previous["train_examples"])
    counts = np.asarray([previous["with_valence"], previous["with_arousal"]])
  else:
    src = data.source(config.data.dir, "train", manifest)
    total, counts, chunk = len(src), np.zeros(2, np.int64), 4096
    for start in range(0, total, chunk):
      for record in src.read_records(np.arange(start, min(total,
                                                           start + chunk))):
        _, _, valence, arousal = data.parse_training_fields(record)
        counts += [-1.0 <= valence <= 1.0, -1.0 <= arousal <= 1.0]
  loss = config.loss
  va_terms = float(loss.va_mse_weight) + float(loss.va_ccc_weight)
  weights = (float(loss.valence_weight) * va_terms,
             float(loss.arousal_weight) * va_terms)
  return {"train_examples": total, "with_valence": int(counts[0]),
          "with_arousal": int(counts[1]),
          "learned": {"valence": bool(counts[0] > 0 and weights[0] > 0),
                      "arousal": bool(counts[1] > 0 and weights[1] > 0)}}


def from_manifest(config, manifest: dict) -> Contract:
  """The contract of ``config`` trained on the data ``manifest`` describes
  (without the optional records, which ``write`` adds)."""
  weights = train_state.class_weights(config, manifest)
  names = class_names(config, manifest)
  return Contract(
      prepared_size=int(manifest["image_size"]),
      host_size=int(batch_loaders.host_image_size(config, manifest)),
      model_size=int(config.image_size),
      encoding=str(manifest.get("encoding", "jpeg")),
      margin=float(manifest.get("options", {}).get("margin", _LEGACY_MARGIN)),
      class_names=tuple(names),
      class_weighting=str(config.loss.class_weighting),
      class_weights=None if weights is None else tuple(
          float(w) for w in weights),
      normalization=normalization(config.model.name),
      data_dir=str(config.data.dir), data_fingerprint=fingerprint(manifest))


def _previous(workdir) -> dict:
  """The contract file already in ``workdir`` as JSON ({} if none or
  unreadable: it is rewritten anyway)."""
  p = epath.Path(workdir) / FILE_NAME
  try:
    return json.loads(p.read_text()) if p.exists() else {}
  except (OSError, ValueError):
    return {}


def write(workdir, config, manifest: dict) -> Contract:
  """Records the run's contract in ``workdir`` (process 0 writes the file).

  A rerun in the same workdir (a resume) rewrites it but keeps its
  ``init_from`` (the start happened once, and a resume never reads the
  source again) and its valence/arousal record when the data's fingerprint
  is unchanged (no second pass over the labels). Other processes return the
  contract without the optional records.
  """
  contract = from_manifest(config, manifest)
  if jax.process_index() == 0:
    previous = _previous(workdir)
    va = previous.get("valence_arousal")
    if previous.get("data", {}).get("fingerprint") != contract.data_fingerprint:
      va = None
    va = valence_arousal_record(config, manifest, va)
    contract = dataclasses.replace(contract, valence_arousal=va,
                                   init_from=previous.get("init_from"))
    fileio.write_json(epath.Path(workdir) / FILE_NAME, contract.to_json(),
                      indent=1)
  return contract


def record_start(workdir, start: dict) -> None:
  """Adds a fine-tuned run's ``init_from`` record to its contract file
  (process 0), after ``write`` and before the first step."""
  if jax.process_index() != 0:
    return
  p = epath.Path(workdir) / FILE_NAME
  obj = json.loads(p.read_text())
  obj["init_from"] = start
  fileio.write_json(p, obj, indent=1)


# --------------------------------------------------------------------------
# Reading one.
# --------------------------------------------------------------------------
def load(workdir, config) -> Contract:
  """The run's recorded contract, or (older runs) one inferred, with a note."""
  p = epath.Path(workdir) / FILE_NAME
  if p.exists():
    try:
      obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{p} is not valid JSON ({e}); delete it to have it "
                       "inferred from config.json and the data dir.") from e
    return Contract.from_json(obj, p)
  contract = infer(config)
  logging.warning("%s has no %s (the run predates it); inferred %s.",
                  workdir, FILE_NAME, "; ".join(contract.inferred))
  return contract


def infer(config) -> Contract:
  """A contract for a run without the file: from its data dir's manifest when
  that still exists, else from config.json alone (``inferred`` says which)."""
  where = epath.Path(str(config.data.dir)) / data.MANIFEST_NAME
  try:
    manifest = data.read_manifest(config.data.dir)
  except (OSError, ValueError):
    manifest = None
  if manifest is not None:
    margin = manifest.get("options", {}).get("margin")
    notes = [f"input size, encoding, {'' if margin is None else 'crop margin, '}"
             f"class names and weights and the data fingerprint from {where} "
             "(the data may have changed since training)"]
    if margin is None:
      notes.append(f"crop margin {_LEGACY_MARGIN} (data_prep's default; "
                   f"{where} does not record it)")
    return dataclasses.replace(from_manifest(config, manifest),
                               inferred=tuple(notes))
  names = data.label_names(int(config.num_classes))
  notes = [f"input size {config.image_size} from config.image_size ({where} "
           "is gone: if the data was prepared larger, predict and export "
           "feed smaller faces than training saw)",
           f"crop margin {_LEGACY_MARGIN} (data_prep's default)",
           "class names from the AffectNet protocol"]
  if config.loss.class_weighting != "none":
    notes.append("class weights unknown: evaluate takes them from the data "
                 "it evaluates")
  return Contract(
      prepared_size=int(config.image_size), host_size=int(config.image_size),
      model_size=int(config.image_size), encoding="unknown",
      margin=_LEGACY_MARGIN, class_names=tuple(names),
      class_weighting=str(config.loss.class_weighting), class_weights=None,
      normalization=normalization(config.model.name),
      data_dir=str(config.data.dir), data_fingerprint=None,
      inferred=tuple(notes))
