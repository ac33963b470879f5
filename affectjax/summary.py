"""The human-readable table printed at the end of a run."""
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
    ("Validation loss", "loss"),
)


def table(result: dict, *, workdir: str | None = None) -> str:
  """Formats a final evaluation record as an aligned two-column table."""
  lines = [f"Validation at step {result.get('step', '?')} "
           f"({result.get('num_examples', '?')} examples)"]
  width = max(len(name) for name, _ in _ROWS)
  lines.append("-" * (width + 12))
  for name, key in _ROWS:
    value = result.get(key)
    text = "n/a" if value is None or (isinstance(value, float)
                                      and math.isnan(value)) else f"{value:.4f}"
    lines.append(f"{name:<{width}}  {text:>8}")
  lines.append("-" * (width + 12))
  if workdir:
    lines.append(f"Workdir: {workdir} (metrics.jsonl, checkpoints/)")
  return "\n".join(lines)
