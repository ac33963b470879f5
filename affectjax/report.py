"""Plots of an evaluation and the run report ``W/report.html``.

Figures (matplotlib, Agg backend: no display needed), each also saved as PNG:
  * confusion matrix, counts or row-normalized (rows = true class);
  * valence/arousal on the circumplex: predictions in the (valence, arousal)
    plane beside predicted-vs-true scatters of each;
  * per-class F1 bars (with the support under each class name);
  * learning curves from ``W/metrics.jsonl``.

``refresh(workdir, config, examples, manifest=..., selection_split=...)``
rewrites ``W/report.html`` (+ PNGs in ``W/report/``) at each evaluation:
learning curves (loss, accuracy, macro-F1, CCC against step), the latest
confusion matrix (an HTML table: no plotting cost) and circumplex, the
dataset (a table of classes by name with their counts per split), the
config (a table of fields, those changed from ``config_base``'s defaults
first), the best checkpoint and the software versions.
The trainer passes what it already holds (its config, the manifest it read at
start, the split it selects checkpoints on); called on a workdir alone, the
report opens it the way the tools do (``workdir.load_config``). It never
raises into the training loop: a plotting or I/O problem is logged as a
warning and the previous report stays. Files are written through
``affectjax.fileio`` (temporary name, then rename); ``metrics.jsonl`` is read
through ``metric_log.read``.

``confusion_matrix_image(cm, names)`` renders the matrix to a uint8 (H, W, 3)
array for TensorBoard (``SummaryWriter.add_image(..., dataformats="HWC")``).
"""
from __future__ import annotations

import datetime
import html
import io
import json
import math
import platform
import time
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from etils import epath  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from affectjax import checkpoint as ckpt_lib  # noqa: E402
from affectjax import data  # noqa: E402
from affectjax import fileio  # noqa: E402
from affectjax import metric_log  # noqa: E402
from affectjax import workdir as workdir_lib  # noqa: E402

DPI = 80
_MAX_SCATTER = 3000  # Points drawn in a scatter (a deterministic subsample).


# --------------------------------------------------------------------------
# Figures to files and arrays.
# --------------------------------------------------------------------------
def save_png(fig: Figure, path) -> None:
  """Saves ``fig`` as a PNG at ``path`` (any epath) and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  plt.close(fig)
  fileio.write_bytes(path, buf.getvalue())


def figure_to_array(fig: Figure) -> np.ndarray:
  """Renders ``fig`` to uint8 (H, W, 3) RGB and closes it."""
  fig.canvas.draw()
  rgba = np.asarray(fig.canvas.buffer_rgba())
  plt.close(fig)
  return np.ascontiguousarray(rgba[..., :3])


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------
def confusion_matrix_figure(cm, names: Sequence[str], *,
                            normalize: bool = False,
                            title: str | None = None) -> Figure:
  """Confusion matrix heat map; rows = true class, columns = predicted."""
  cm = np.asarray(cm, np.float64)
  if normalize:
    rows = cm.sum(axis=1, keepdims=True)
    values = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  else:
    values = cm
  n = len(names)
  fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n, 0.8 + 0.55 * n))
  im = ax.imshow(values, cmap="Blues", vmin=0,
                 vmax=1 if normalize else max(1.0, values.max()))
  ax.set_xticks(range(n), names, rotation=45, ha="right")
  ax.set_yticks(range(n), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  hi = (1 if normalize else max(1.0, values.max())) / 2
  for i in range(n):
    for j in range(n):
      text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
      ax.text(j, i, text, ha="center", va="center", fontsize=7,
              color="white" if values[i, j] > hi else "black")
  ax.set_title(title or ("Confusion matrix (row-normalized)" if normalize
                         else "Confusion matrix (counts)"), fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  return fig


def _subsample(n: int) -> np.ndarray:
  if n <= _MAX_SCATTER:
    return np.arange(n)
  return np.random.default_rng(0).choice(n, _MAX_SCATTER, replace=False)


def circumplex_figure(valence, arousal, pred_valence, pred_arousal,
                      expression=None, names: Sequence[str] = ()) -> Figure:
  """Predicted (valence, arousal) on the circumplex, and predicted vs true.

  Rows whose target lies outside [-1, 1] (AffectNet's -2 "no value") are
  left out of the predicted-vs-true panels.
  """
  v, a = np.asarray(valence, float), np.asarray(arousal, float)
  pv, pa = np.asarray(pred_valence, float), np.asarray(pred_arousal, float)
  pick = _subsample(len(v))
  fig, axes = plt.subplots(1, 3, figsize=(12, 4))
  ax = axes[0]
  ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="0.6", lw=0.8))
  ax.axhline(0, color="0.8", lw=0.6)
  ax.axvline(0, color="0.8", lw=0.6)
  if expression is not None and len(names):
    e = np.asarray(expression)[pick]
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(names):
      sel = e == c
      if sel.any():
        ax.scatter(pv[pick][sel], pa[pick][sel], s=6, alpha=0.6,
                   color=cmap(c), label=name)
    ax.legend(fontsize=6, markerscale=2, loc="lower left", ncol=2)
  else:
    ax.scatter(pv[pick], pa[pick], s=6, alpha=0.6)
  ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel="predicted valence",
         ylabel="predicted arousal", aspect="equal")
  ax.set_title("Predictions on the circumplex (colour: true class)",
               fontsize=9)
  for ax, t, p, name in ((axes[1], v, pv, "valence"),
                         (axes[2], a, pa, "arousal")):
    ok = (t >= -1) & (t <= 1)
    sel = pick[ok[pick]]
    ax.scatter(t[sel], p[sel], s=5, alpha=0.5)
    ax.plot([-1, 1], [-1, 1], color="0.5", lw=0.8)
    ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel=f"true {name}",
           ylabel=f"predicted {name}", aspect="equal")
    ax.set_title(f"{name}: predicted vs true ({int(ok.sum())} rows)",
                 fontsize=9)
  fig.tight_layout()
  return fig


def per_class_f1_figure(f1, names: Sequence[str], support=None) -> Figure:
  """Per-class F1 bars; NaN (class absent and never predicted) drawn as 0."""
  f1 = np.asarray([np.nan if x is None else x for x in f1], float)
  labels = list(names)
  if support is not None:
    labels = [f"{n}\n(n={int(s)})" for n, s in zip(names, support)]
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 3.2))
  ax.bar(range(len(names)), np.nan_to_num(f1), color="tab:blue")
  for i, x in enumerate(f1):
    ax.text(i, (0 if np.isnan(x) else x) + 0.01,
            "n/a" if np.isnan(x) else f"{x:.2f}", ha="center", fontsize=7)
  ax.set_xticks(range(len(names)), labels, fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("F1")
  ax.set_title("Per-class F1", fontsize=9)
  fig.tight_layout()
  return fig


_CURVES = (("loss", ("loss",)), ("accuracy", ("accuracy",)),
           ("macro-F1", ("macro_f1",)),
           ("CCC", ("valence_ccc", "arousal_ccc")))


def learning_curves_figure(records: Sequence[dict]) -> Figure:
  """Loss, accuracy, macro-F1 and valence/arousal CCC against step, per split.

  A panel no record has a value for (CCC on a set without valence/arousal,
  such as FER2013) is left out rather than drawn empty.
  """
  curves = [(title, keys) for title, keys in _CURVES if any(
      isinstance(r.get(k), (int, float)) for r in records for k in keys)]
  curves = curves or list(_CURVES[:1])
  fig, axes = plt.subplots(1, len(curves), figsize=(2.6 * len(curves), 2.6),
                           squeeze=False)
  splits = sorted({r.get("split", "?") for r in records})
  for ax, (title, keys) in zip(axes[0], curves):
    for split in splits:
      for key in keys:
        pts = [(r["step"], r[key]) for r in records if r.get("split") == split
               and isinstance(r.get(key), (int, float))]
        if pts:
          xs, ys = zip(*pts)
          label = split if len(keys) == 1 else f"{split} {key.split('_')[0]}"
          ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=label)
    ax.set_title(title, fontsize=9)
    ax.locator_params(nbins=4)
    ax.tick_params(labelsize=7)
    if ax.lines:
      ax.legend(fontsize=6, frameon=False)
  # Fixed margins: tight_layout would draw every text twice (the report is
  # refreshed inside the training loop, so its cost matters).
  fig.subplots_adjust(left=0.05, right=0.99, bottom=0.1, top=0.9, wspace=0.3)
  return fig


def confusion_matrix_image(cm, names: Sequence[str], *,
                           normalize: bool = True) -> np.ndarray:
  """uint8 (H, W, 3) rendering of the confusion matrix (for TensorBoard)."""
  return figure_to_array(confusion_matrix_figure(cm, names,
                                                 normalize=normalize))


def save_eval_plots(directory, result: dict, names: Sequence[str],
                    examples: dict | None = None) -> list[str]:
  """The evaluation PNGs of ``result`` (``scoring.evaluate``'s dict) in
  ``directory``; returns the file names written."""
  directory = epath.Path(directory)
  written = []
  for name, normalize in (("confusion_matrix.png", False),
                          ("confusion_matrix_normalized.png", True)):
    save_png(confusion_matrix_figure(result["confusion_matrix"], names,
                                     normalize=normalize), directory / name)
    written.append(name)
  save_png(per_class_f1_figure(result["per_class_f1"], names,
                               result.get("per_class_support")),
           directory / "per_class_f1.png")
  written.append("per_class_f1.png")
  if examples is not None:
    save_png(circumplex_figure(examples["valence"], examples["arousal"],
                               examples["va"][:, 0], examples["va"][:, 1],
                               examples["expression"], names),
             directory / "circumplex.png")
    written.append("circumplex.png")
  return written


# --------------------------------------------------------------------------
# The run report.
# --------------------------------------------------------------------------
def software_versions() -> dict[str, str]:
  """Versions of Python and the libraries a run depends on."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  for dist in ("affectjax", "jax", "jaxlib", "flax", "optax",
               "orbax-checkpoint", "grain", "array-record", "numpy",
               "matplotlib"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = "not installed"
  return out


def _read_manifest(data_dir: str) -> dict[str, Any] | None:
  """The data dir's manifest when the caller has none at hand (None if gone:
  a copied run need not carry its data)."""
  if not data_dir:
    return None
  try:
    return data.read_manifest(data_dir)
  except FileNotFoundError:
    return None


_SPLIT_ORDER = ("train", "holdout", "val")


def dataset_html(data_dir: str, m: dict[str, Any]) -> str:
  """The Dataset section's tables: the prepared dir's facts, then one row per
  class (by name) with its count in each split, the examples written and
  skipped per split."""
  facts = [("dir", data_dir)] + [
      (k, m[k]) for k in ("dataset", "layout", "image_size", "encoding",
                          "num_classes") if k in m]
  parts = [_table(facts)]
  splits = m.get("splits") or {}
  names = sorted(splits, key=lambda s: (
      _SPLIT_ORDER.index(s) if s in _SPLIT_ORDER else len(_SPLIT_ORDER), s))
  if not names:
    return parts[0]
  counts = {s: splits[s].get("class_counts") or [] for s in names}
  n = max([len(c) for c in counts.values()]
          + [int(m.get("num_classes") or 0)])
  labels = m.get("label_names")
  if not labels or len(labels) != n:
    labels = data.label_names(n) if n in (7, 8) else [str(i) for i in range(n)]
  head = "".join(f"<th>{html.escape(s)}</th>" for s in names)
  rows = []
  for i, label in enumerate(labels):
    cells = "".join(
        f"<td style='text-align:right'>"
        f"{counts[s][i] if i < len(counts[s]) else 'n/a'}</td>" for s in names)
    rows.append(f"<tr><th>{html.escape(str(label))}</th>{cells}</tr>")

  def total_row(title, value):
    cells = "".join(f"<td style='text-align:right'>{html.escape(_fmt(value(splits[s])))}"
                    "</td>" for s in names)
    return f"<tr><th>{title}</th>{cells}</tr>"

  rows.append(total_row("examples", lambda i: i.get(
      "written", i.get("num_examples"))))
  if any("skipped" in splits[s] for s in names):
    rows.append(total_row("skipped", lambda i: sum(
        (i.get("skipped") or {}).values()) if isinstance(
            i.get("skipped"), dict) else i.get("skipped")))
  parts.append(f"<table class='dataset'><tr><th>class</th>{head}</tr>"
               f"{''.join(rows)}</table>")
  return "\n".join(parts)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (config fields by their flag name)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(_flat(value, name + "."))
    else:
      out[name] = value
  return out


def config_html(config) -> str:
  """The Config section's table: every field by its ``--config.`` name, the
  fields that differ from ``config_base``'s defaults first (with the
  default beside them), then the rest."""
  from affectjax import config_base  # pylint: disable=g-import-not-at-top
  values = _flat(fileio.to_json_compatible(config.to_dict()))
  defaults = _flat(fileio.to_json_compatible(
      config_base.get_base_config().to_dict()))
  def same(k):
    return k in defaults and json.dumps(values[k]) == json.dumps(defaults[k])
  changed = [k for k in values if not same(k)]
  rest = [k for k in values if same(k)]

  def cell(v):
    return html.escape(json.dumps(v) if not isinstance(v, str) else repr(v))

  rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(values[k])}</td>"
                 f"<td>{cell(defaults[k]) if k in defaults else '(none)'}"
                 "</td></tr>" for k in changed)
  same_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(values[k])}"
                      "</td></tr>" for k in rest)
  return (f"<h3>Changed from the defaults ({len(changed)})</h3>"
          "<table class='config'><tr><th>field</th><th>value</th>"
          f"<th>default</th></tr>{rows}</table>"
          f"<details><summary>The other {len(rest)} fields, at their "
          "defaults</summary><table class='config'><tr><th>field</th>"
          f"<th>value</th></tr>{same_rows}</table></details>")


def _table(rows: Sequence[tuple[str, Any]]) -> str:
  cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>"
                  f"{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
  return f"<table>{cells}</table>"


def _fmt(v) -> str:
  if isinstance(v, float):
    return "n/a" if not math.isfinite(v) else f"{v:.4f}"
  if v is None:
    return "n/a"
  return str(v)


def confusion_matrix_html(cm, names: Sequence[str]) -> str:
  """The confusion matrix as an HTML table: counts, shaded by row share."""
  cm = np.asarray(cm, np.int64)
  rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
  head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
  body = []
  for i, name in enumerate(names):
    cells = []
    for j in range(len(names)):
      share = cm[i, j] / rows[i, 0]
      color = "#fff" if share > 0.5 else "#000"
      cells.append(f"<td style='background:rgba(31,119,180,{share:.2f});"
                   f"color:{color};text-align:right'>{cm[i, j]}</td>")
    body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}"
                f"<td>{int(cm[i].sum())}</td></tr>")
  return (f"<table class='cm'><tr><th>true \\ predicted</th>{head}"
          f"<th>support</th></tr>{''.join(body)}</table>")


def build_report(workdir, config, examples: dict | None = None, *,
                 manifest: dict | None = None,
                 selection_split: str | None = None) -> str:
  """Writes the report PNGs and returns the report's HTML.

  Args:
    workdir: the run directory.
    config: the run's config.
    examples: ``scoring.evaluate(..., collect=True)["examples"]`` of the
      latest evaluation, for the circumplex; without it the report shows the
      circumplex of the latest ``affectjax.evaluate`` output, if any.
    manifest: the prepared data's manifest (None: read from
      ``config.data.dir`` if it is still there).
    selection_split: the split the trainer ranks checkpoints on
      (``train.selection_split``), shown beside the best checkpoint.
  """
  workdir = workdir_lib.path(workdir)
  out = workdir / "report"
  if manifest is None:
    manifest = _read_manifest(str(config.data.dir))
  records = metric_log.read(workdir)
  evals = [r for r in records if r.get("split") not in (None, "train")]
  parts = [f"<h1>affectjax run report</h1><p>{html.escape(str(workdir))} "
           f"&middot; updated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC</p>"]
  if records:
    save_png(learning_curves_figure(records), out / "learning_curves.png")
    parts.append("<h2>Learning curves</h2>"
                 "<img src='report/learning_curves.png'>")
  if evals:
    last = evals[-1]
    names = data.label_names(int(config.num_classes))
    parts.append(f"<h2>Latest evaluation: {html.escape(str(last['split']))} "
                 f"at step {last['step']}</h2>")
    keys = ("num_examples", "loss", "accuracy", "macro_f1", "valence_ccc",
            "valence_rmse", "arousal_ccc", "arousal_rmse")
    parts.append(_table([(k, last.get(k)) for k in keys if k in last]))
    if last.get("confusion_matrix"):
      parts.append("<h3>Confusion matrix (rows: true, columns: predicted; "
                   "row-normalized shading)</h3>")
      parts.append(confusion_matrix_html(last["confusion_matrix"], names))
    if examples is not None:
      save_png(circumplex_figure(examples["valence"], examples["arousal"],
                                 examples["va"][:, 0], examples["va"][:, 1],
                                 examples["expression"], names),
               out / "circumplex.png")
      parts.append("<h3>Valence/arousal</h3>"
                   "<img src='report/circumplex.png'>")
    else:
      circ = _latest_circumplex(workdir)
      if circ:
        parts.append("<h3>Valence/arousal (last <code>evaluate</code> "
                     f"run: {html.escape(circ.split('/')[1])})</h3>"
                     f"<img src='{html.escape(circ)}'>")
  best = _best_record(workdir)
  parts.append("<h2>Best checkpoint</h2>")
  if best:
    rows = [("step", best.get("step")),
            ("metric", f"{best.get('metric')} ({best.get('mode')})"),
            ("value", best.get("value"))]
    if selection_split:
      rows.append(("chosen on split", selection_split))
    parts.append(_table(rows))
  else:
    parts.append("<p>No checkpoint has been ranked yet.</p>")
  parts.extend(_start_section(workdir))
  parts.append("<h2>Dataset</h2>")
  if manifest:
    parts.append(dataset_html(str(config.data.dir), manifest))
  else:
    parts.append("<p>manifest.json not found.</p>")
  parts.extend(_budget_section(workdir))
  parts.append("<h2>Config</h2>" + config_html(config))
  parts.append("<h2>Software</h2>" + _table(list(software_versions().items())))
  style = ("<style>body{font-family:sans-serif;margin:1.5em}"
           "table{border-collapse:collapse}th,td{border:1px solid #ccc;"
           "padding:2px 8px;text-align:left}img{max-width:100%}</style>")
  return (f"<!doctype html><html><head><meta charset='utf-8'>"
          f"<title>affectjax report</title>{style}</head><body>"
          + "\n".join(parts) + "</body></html>\n")


def _best_record(workdir) -> dict | None:
  try:
    return ckpt_lib.read_best_record(workdir / workdir_lib.CHECKPOINTS)
  except (OSError, ValueError):
    return None


def _start_section(workdir) -> list[str]:
  """"Started from": a fine-tuned run's source (its contract's ``init_from``,
  see ``affectjax.init_from``); nothing for a run from scratch or ImageNet."""
  from affectjax import init_from  # pylint: disable=g-import-not-at-top
  from affectjax import run_contract  # pylint: disable=g-import-not-at-top
  try:
    record = json.loads((workdir / run_contract.FILE_NAME).read_text()
                        ).get("init_from")
  except (OSError, ValueError):
    return []
  if not record:
    return []
  return ["<h2>Started from</h2>",
          f"<p>{html.escape(init_from.describe(record))}</p>",
          _table([(k, record.get(k)) for k in (
              "workdir", "checkpoint", "step", "ema", "model",
              "data_fingerprint", "weights_sha256")])]


def _budget_section(workdir) -> list[str]:
  """"Time budget": the run's plan (``W/time_budget.json``), if it has one."""
  from affectjax import time_budget  # pylint: disable=g-import-not-at-top
  try:
    plan = time_budget.load(workdir)
  except (OSError, ValueError):
    return []
  if plan is None:
    return []
  rows = [("budget", time_budget.describe(plan.budget_s)),
          ("planned steps", plan.total_steps),
          ("measured", f"{plan.step_s * 1e3:.1f} ms/step over "
                       f"{plan.window_steps} steps"),
          ("evaluation every", f"{plan.eval_every_steps} steps "
                               f"({plan.eval_s:.1f} s each)"),
          ("checkpoint every", f"{plan.checkpoint_every_steps} steps"),
          ("spent before the plan", f"{plan.planned_at_s:.0f} s")]
  if plan.stopped_early_at is not None:
    rows.append(("stopped early at", f"step {plan.stopped_early_at} (the "
                 "machine slowed; the schedule did not reach its end)"))
  elif plan.finished_at_s is not None:
    rows.append(("finished", f"in {plan.finished_at_s:.0f} s"))
  return ["<h2>Time budget</h2>", _table(rows)]


def _latest_circumplex(workdir) -> str | None:
  d = workdir / "eval"
  if not d.exists():
    return None
  found = sorted(d.glob("*/circumplex.png"), key=lambda p: p.stat().mtime)
  return f"eval/{found[-1].parent.name}/circumplex.png" if found else None


def refresh(workdir, config=None, examples: dict | None = None, *,
            manifest: dict | None = None,
            selection_split: str | None = None) -> bool:
  """Rewrites ``W/report.html``; True on success. Never raises (logs a warning).

  Call it on process 0 after each evaluation (see ``build_report`` for the
  arguments); ``config`` None reads the run's ``config.json``.
  """
  t0 = time.perf_counter()
  try:
    if config is None:
      config = workdir_lib.load_config(workdir)
    fileio.write_text(workdir_lib.path(workdir) / "report.html",
                      build_report(workdir, config, examples,
                                   manifest=manifest,
                                   selection_split=selection_split))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not refresh %s/report.html: %s: %s", workdir,
                    type(e).__name__, e)
    plt.close("all")
    return False
  logging.info("Refreshed %s/report.html in %.2f s", workdir,
               time.perf_counter() - t0)
  return True
