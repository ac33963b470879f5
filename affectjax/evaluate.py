r"""Evaluate a checkpoint of a run: metrics, per-example predictions, plots.

  python -m affectjax.evaluate --workdir=runs/demo [--checkpoint=best|latest|STEP]
      [--data_dir=DIR] [--split=val] [--tta=none|flip|crops] [--classes=8|7]

Writes ``W/eval/<checkpoint>-<split>[-flip][-Nclass][-on-<data dir name>]/``:
  metrics.json      every metric of the trainer's evaluation plus per-class
                    precision, recall, F1 and support, the classes compared
                    and the rows left out, and what was evaluated (for a
                    fine-tuned run, ``init_from``: the run it started from);
  predictions.csv   one row per example: path, true and predicted class, the
                    class probabilities, true and predicted valence/arousal;
  confusion_matrix.png, confusion_matrix_normalized.png, circumplex.png,
  per_class_f1.png.

Every example is evaluated exactly once, on every device (and every host
under ``--distributed``), by the trainer's own evaluation code
(``affectjax.scoring``); process 0 writes the files.

``--data_dir`` may be another data set (cross-dataset evaluation): classes
are matched by name (``scoring.match_classes``). Only the classes the model
and the data share are scored; a class the data lacks loses its logit
column before the argmax, rows of a class the model lacks are left out and
counted, and the loss (the model's own quantity) is reported only when both
have the same classes. ``--classes=7`` is the same mechanism restricted to
AffectNet's 7 classes without Contempt.
"""
from __future__ import annotations

import csv
import io
import sys

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from affectjax import data
from affectjax import cli
from affectjax import fileio
from affectjax import init_from
from affectjax import report
from affectjax import scoring
from affectjax import workdir as workdir_lib


def output_name(label: str, split: str, tta: str, classes: int,
                num_classes: int, other_data: str | None = None) -> str:
  """``<checkpoint>-<split>`` plus ``-flip``, ``-<classes>class`` (fewer
  classes compared than the model has) and ``-on-<name>`` (a data dir other
  than the run's) when they apply."""
  name = f"{label}-{split}"
  if tta != "none":
    name += f"-{tta}"
  if classes != num_classes:
    name += f"-{classes}class"
  if other_data:
    name += f"-on-{other_data}"
  return name


def class_line(result: dict) -> str:
  """The summary line of a result: classes compared, rows left out."""
  names = result["class_names"]
  line = f"Classes compared: {len(names)} ({', '.join(names)})"
  left = result.get("classes_left_out") or {}
  for reason in dict.fromkeys(left.values()):
    line += f"; {reason}: {', '.join(n for n, r in left.items() if r == reason)}"
  by_class = result.get("rows_left_out_by_class") or {}
  line += f". Rows left out: {result.get('rows_left_out', 0)}"
  if by_class:
    line += " (" + ", ".join(f"{n} {c}" for n, c in by_class.items()) + ")"
  if left:
    line += (". No loss: the model's loss is defined on its own classes, "
             "not on these")
  return line + "."


def _other_data_name(run) -> str | None:
  """The name of the data dir evaluated when it is not the one the run was
  trained on (its contract's), else None."""
  evaluated = epath.Path(run.config.data.dir)
  own = run.contract.data_dir
  if own and str(evaluated) == str(epath.Path(own)):
    return None
  return evaluated.name or "data"


def split_paths(data_dir: str, split: str, indices: np.ndarray,
                manifest: dict | None = None) -> list[str]:
  """The ``path`` field of records ``indices`` of ``split`` (images not
  decoded); ``manifest``: the data dir's, if already read."""
  src = data.source(data_dir, split, manifest)
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  reader = array_record_data_source.ArrayRecordDataSource(src.paths)
  try:
    return [data.decode_record(reader[int(i)], encoding=src.encoding,
                               image_size=src.image_size,
                               decode_image=False)["path"] for i in indices]
  finally:
    close = getattr(reader, "close", None)
    if close:
      close()


def predictions_csv(paths, examples: dict, names) -> str:
  """The predictions table as CSV text (see the module docstring)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["index", "path", "true_class", "true_name", "pred_class",
              "pred_name", *[f"prob_{n}" for n in names], "valence", "arousal",
              "pred_valence", "pred_arousal"])
  pred = examples["probs"].argmax(axis=1)
  for i in range(len(paths)):
    t, p = int(examples["expression"][i]), int(pred[i])
    w.writerow([int(examples["index"][i]), paths[i], t, names[t], p, names[p],
                *[f"{x:.6f}" for x in examples["probs"][i]],
                f"{examples['valence'][i]:.6f}", f"{examples['arousal'][i]:.6f}",
                f"{examples['va'][i, 0]:.6f}", f"{examples['va'][i, 1]:.6f}"])
  return buf.getvalue()


def heading(result: dict) -> str:
  """The table's first line: which split, step and checkpoint, how many rows."""
  extras = [f"{result['checkpoint']} checkpoint"] if (
      result["checkpoint"] != str(result["step"])) else []
  if result.get("tta", "none") != "none":
    extras.append(f"TTA {result['tta']}")
  return (f"Split {result['split']!r} of {result['data_dir']} at step "
          f"{result['step']}" + (f" ({', '.join(extras)})" if extras else "")
          + f": {result['num_examples']} examples")


def run_evaluation(workdir_or_run, *, checkpoint: str = "best",
                   data_dir: str | None = None, split: str = "val",
                   tta: str = "none", classes: int | None = None,
                   use_ema: bool = True, output_dir=None,
                   write_files: bool = True) -> tuple[dict, epath.Path]:
  """Opens the run, evaluates, and (process 0) writes the files.

  ``workdir_or_run`` is a workdir, or a ``workdir.Run`` already opened (then
  ``checkpoint`` and ``data_dir`` are the run's). Returns (result, output
  directory); ``result`` is ``scoring.evaluate``'s dict plus ``step``,
  ``checkpoint``, ``split``, ``tta``, ``ema``, ``data_dir``, and
  ``examples`` (the per-example arrays; not written to metrics.json).
  """
  if isinstance(workdir_or_run, workdir_lib.Run):
    run = workdir_or_run
  else:
    run = workdir_lib.open_run(workdir_or_run, checkpoint=checkpoint,
                               data_dir=data_dir)
  config = run.config
  num_classes = int(config.num_classes)
  manifest = data.read_manifest(config.data.dir)  # Once, passed down.
  result = scoring.evaluate(run.state, run.eval_fn(tta, use_ema), config,
                            run.mesh, split=split, collect=True,
                            classes=classes,
                            model_classes=run.contract.class_names,
                            progress=None, manifest=manifest)
  examples = result["examples"]
  result.update(step=run.step, checkpoint=run.label, split=split, tta=tta,
                ema=bool(use_ema and "ema" in run.state),
                data_dir=str(config.data.dir))
  if run.contract.init_from:  # A fine-tuned run: where it started.
    result["init_from"] = run.contract.init_from
  out = epath.Path(output_dir) if output_dir else (
      run.workdir / "eval" / output_name(
          run.label, split, tta, result["num_classes"], num_classes,
          _other_data_name(run)))
  if write_files and jax.process_index() == 0:
    names = result["class_names"]
    fileio.write_json(out / "metrics.json", scoring.metrics_subset(result))
    paths = split_paths(config.data.dir, split, examples["index"], manifest)
    fileio.write_text(out / "predictions.csv",
                      predictions_csv(paths, examples, names))
    report.save_eval_plots(out, result, names, examples)
    logging.info("Wrote %s", out)
  return result, out


# --------------------------------------------------------------------------
# Command line. Flags are defined in `run()`, not at import, so the library
# functions above import cleanly next to the other entry points' flags.
# --------------------------------------------------------------------------
def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best (by "
                      "config.checkpoint.best_metric), latest, or a step.")
  flags.DEFINE_string("data_dir", None, "Prepared data dir; default: the "
                      "run's config.data.dir. Another data set is scored on "
                      "the classes it shares with the model (by name).")
  flags.DEFINE_string("split", "val", "Split to evaluate: val, holdout (when "
                      "data_prep made one) or train.")
  flags.DEFINE_enum("tta", "none", scoring.TTA_MODES,
                    "flip: average the image and its mirror; crops: ten "
                    "views (the image, its 4 corner crops, their mirrors).")
  flags.DEFINE_enum("classes", None, ["8", "7"], "Default: every class the "
                    "model and the data share. 7 scores an 8-class model on "
                    "the 7-class protocol (Contempt logit and rows dropped).")
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the "
                    "checkpoint has them.")
  flags.DEFINE_string("output_dir", None, "Default: "
                      "WORKDIR/eval/<checkpoint>-<split>[-flip][-Nclass][-on-<data>].")
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() "
                    "first (multi-host: every host runs the same command).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  from affectjax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(auto=f.distributed)
  distributed.check_devices()
  result, out = run_evaluation(
      f.workdir, checkpoint=f.checkpoint, data_dir=f.data_dir, split=f.split,
      tta=f.tta, classes=None if f.classes is None else int(f.classes),
      use_ema=f.use_ema, output_dir=f.output_dir)
  if jax.process_index() == 0:
    from affectjax import summary  # pylint: disable=g-import-not-at-top
    print(summary.table(result, heading=heading(result)), flush=True)
    print(class_line(result), flush=True)
    started = init_from.describe(result.get("init_from"))
    if started:
      print(started, flush=True)
    print(f"Wrote {out}/ (metrics.json, predictions.csv, *.png)", flush=True)


def run() -> None:
  _define_flags()
  app.run(cli.tool(main, "affectjax.evaluate"), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
