"""The human-readable table printed at the end of a run.

Two columns of metrics on the run's result split (``val``; the selection
split, e.g. ``holdout``, when ``config.eval_val_during_training`` is off): the
last step's (the weights the run ended with) and the best checkpoint's (the
step ``best.json`` names, which ``evaluate``/``predict``/``export`` open by
default). Each heading says which step it is, so the last step is never
passed off as the best, and which split.
"""
from __future__ import annotations

import math

_ROWS = (
    ("Expression accuracy", "accuracy"),
    ("Expression macro-F1", "macro_f1"),
    ("Valence CCC", "valence_ccc"),
    ("Valence PCC", "valence_pcc"),
    ("Valence RMSE", "valence_rmse"),
    ("Valence SAGR", "valence_sagr"),
    ("Arousal CCC", "arousal_ccc"),
    ("Arousal PCC", "arousal_pcc"),
    ("Arousal RMSE", "arousal_rmse"),
    ("Arousal SAGR", "arousal_sagr"),
    ("Loss", "loss"),
)
_TITLES = {"val": "Validation", "holdout": "Holdout", "train": "Training"}


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return f"{value:.4f}"


def table(result: dict, *, workdir: str | None = None,
          heading: str | None = None) -> str:
  """Formats the final evaluation as an aligned table.

  Args:
    result: ``train.train_and_evaluate``'s return: the last step's record
      of its result split (``val``, or the selection split), with ``best``
      (``{"step", "metric", "split", "value", "val", "result"}``, ``result``
      being that step's record of the same split) when a checkpoint was
      ranked; or any evaluation record with ``heading`` saying what it is.
    workdir: printed at the bottom, where the files are.
    heading: the first line; default: the trainer's ("Validation at step N
      (k examples), the last step"; "Holdout at ..." for the holdout).
  """
  step = result.get("step", "?")
  split = result.get("split", "val")
  title = _TITLES.get(split, f"Split {split!r}")
  lines = [heading or f"{title} at step {step} "
           f"({result.get('num_examples', '?')} examples), the last step"]
  best = result.get("best")
  columns = [(f"last, step {step}", result)]
  if best:
    lines.append(
        f"Best checkpoint: step {best['step']}, {best['metric']} "
        f"{_fmt(best.get('value'))} on {best['split']}"
        + (" (the last step)" if best["step"] == step else ""))
    at_best = best.get("result", best.get("val") if split == "val" else None)
    if best["step"] != step and at_best:
      columns.append((f"best, step {best['step']}", at_best))
  width = max(len(name) for name, _ in _ROWS)
  col = max(8, *(len(title) for title, _ in columns))
  rule = "-" * (width + (col + 2) * len(columns))
  lines.append(rule)
  if len(columns) > 1:
    lines.append(" " * width + "".join(f"  {t:>{col}}" for t, _ in columns))
  for name, key in _ROWS:
    lines.append(f"{name:<{width}}" + "".join(
        f"  {_fmt(record.get(key)):>{col}}" for _, record in columns))
  lines.append(rule)
  budget = result.get("time_budget")
  if budget:
    lines.append(_budget_line(budget))
  if workdir:
    lines.append(f"Workdir: {workdir} (metrics.jsonl, checkpoints/)")
  return "\n".join(lines)


def _budget_line(budget: dict) -> str:
  """One line on the time budget (``train_and_evaluate``'s ``time_budget``)."""
  from affectjax import time_budget  # pylint: disable=g-import-not-at-top
  head = (f"Time budget {time_budget.describe(budget['budget_s'])}: "
          f"{budget['spent_s']:.0f} s used")
  if budget.get("stopped_early_at") is not None:
    return (f"{head}; stopped at step {budget['stopped_early_at']} of the "
            f"plan's {budget['total_steps']} (the machine slowed; the "
            "learning-rate schedule did not reach its end)")
  return (f"{head}; the plan's {budget['total_steps']} steps "
          f"({budget['step_s'] * 1e3:.1f} ms each) completed")
