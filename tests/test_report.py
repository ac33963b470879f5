"""`affectjax.report`: the run report and the plots are real images."""
import time

import numpy as np
import pytest
from absl import logging
from PIL import Image

from affectjax import data
from affectjax import report
from affectjax import scoring
from affectjax import workdir as workdir_lib
from tests import use_fixtures


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, synthetic_arrayrecord):
  return use_fixtures.trained_workdir(tmp_path_factory, synthetic_arrayrecord)


def test_refresh_writes_report_with_curves_confusion_config_versions(run_dir):
  config = workdir_lib.load_config(run_dir)
  assert report.refresh(run_dir, config)  # Warm (first matplotlib use).
  t0 = time.perf_counter()
  assert report.refresh(run_dir, config)
  elapsed = time.perf_counter() - t0
  assert elapsed < 5, elapsed  # ~0.3 s on an idle 2-core VM.
  page = (run_dir / "report.html").read_text()
  for needle in ("Learning curves", "report/learning_curves.png",
                 "class='cm'", "at step 6", "macro_f1",
                 "<th>num_classes</th>", "flax", "Dataset", "examples"):
    assert needle in page, needle
  for name in ("learning_curves.png",):
    with Image.open(run_dir / "report" / name) as im:
      assert im.format == "PNG" and im.size[0] > 300
      assert np.asarray(im.convert("L")).std() > 5  # Not a blank canvas.


def test_refresh_uses_what_the_trainer_passes_and_opens_a_run_alone(
    run_dir, tmp_path):
  """The trainer's manifest and selection split are used as given (no
  second read of the data dir); called on a workdir alone, the report reads
  its config.json, and a data dir that is gone is no error."""
  config = workdir_lib.load_config(run_dir)
  config.data.dir = str(tmp_path / "gone")  # Nothing to read there.
  manifest = {"splits": {"train": {"num_examples": 7}}, "image_size": 24,
              "layout": "passed-by-the-trainer"}
  assert report.refresh(run_dir, config, manifest=manifest,
                        selection_split="holdout")
  page = (run_dir / "report.html").read_text()
  assert "passed-by-the-trainer" in page
  assert "<th>chosen on split</th><td>holdout</td>" in page
  assert report.refresh(str(run_dir))  # Config from W/config.json.
  page = (run_dir / "report.html").read_text()
  assert "passed-by-the-trainer" not in page and "Dataset" in page
  assert "at step 6" in page


def test_an_evaluation_cycle_reads_no_manifest_when_given_one(run_dir,
                                                               monkeypatch):
  """The trainer reads manifest.json once per run and passes it down: the
  evaluation (source, decoder, pixel cache) and the report use it as given."""
  run = workdir_lib.open_run(run_dir, checkpoint="latest")
  manifest = data.read_manifest(run.config.data.dir)

  def read_again(*args, **kwargs):
    raise AssertionError(f"manifest.json read again: {args}")

  monkeypatch.setattr(data, "read_manifest", read_again)
  result = scoring.evaluate(run.state, run.eval_fn(), run.config, run.mesh,
                            collect=True, manifest=manifest)
  assert result["num_examples"] == len(data.source(
      run.config.data.dir, "val", manifest))
  assert report.refresh(run_dir, run.config, result["examples"],
                        manifest=manifest, selection_split="val")


def test_refresh_never_raises(run_dir, monkeypatch):
  config = workdir_lib.load_config(run_dir)
  before = (run_dir / "report.html").read_text() if (
      run_dir / "report.html").exists() else None

  def boom(*a, **k):
    raise RuntimeError("plotting broke")
  monkeypatch.setattr(report, "learning_curves_figure", boom)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda *a: warnings.append(a))
  assert report.refresh(run_dir, config) is False
  assert warnings and "plotting broke" in str(warnings[0])
  if before is not None:  # The previous report stays intact.
    assert (run_dir / "report.html").read_text() == before


def test_confusion_matrix_image_for_tensorboard():
  cm = np.arange(64).reshape(8, 8)
  img = report.confusion_matrix_image(cm, [f"c{i}" for i in range(8)])
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 5


def test_learning_curves_leave_out_a_panel_no_record_has():
  """FER2013 has no valence/arousal: no empty CCC panel; with CCCs, four."""
  records = [{"split": s, "step": k, "loss": 1.0 / k, "accuracy": 0.1 * k,
              "macro_f1": 0.05 * k} for s in ("train", "holdout")
             for k in (1, 2, 3)]
  titles = lambda recs: [ax.get_title() for ax in
                         report.learning_curves_figure(recs).axes]
  assert titles(records) == ["loss", "accuracy", "macro-F1"]
  with_va = [dict(r, valence_ccc=0.4, arousal_ccc=0.3) for r in records]
  assert titles(with_va) == ["loss", "accuracy", "macro-F1", "CCC"]


def test_dataset_and_config_are_tables(run_dir):
  """Dataset: one row per class, by name, with its count in each split;
  Config: the fields changed from config_base's defaults first, each beside
  its default, the rest after; neither is a JSON dump."""
  import json  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(run_dir)
  manifest = data.read_manifest(config.data.dir)
  assert report.refresh(run_dir, config, manifest=manifest)
  page = (run_dir / "report.html").read_text()
  assert "<pre>" not in page
  dataset = re.search(r"<table class='dataset'>(.*?)</table>", page).group(1)
  cells = lambda row: re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)
  rows = [cells(r) for r in re.findall(r"<tr>(.*?)</tr>", dataset)]
  assert rows[0] == ["class", "train", "val"]
  by_class = {r[0]: [int(v) for v in r[1:]] for r in rows[1:]
              if r[0] not in ("examples", "skipped")}
  for i, name in enumerate(data.label_names(8)):
    assert by_class[name] == [manifest["splits"][s]["class_counts"][i]
                              for s in ("train", "val")], name
  examples = next(r for r in rows if r[0] == "examples")
  assert examples[1:] == ["160", "52"]
  section = page[page.index("<h2>Config</h2>"):page.index("<h2>Software")]
  changed, rest = section.split("<details>", 1)
  changed_rows = {r[0]: r[1:] for r in map(
      cells, re.findall(r"<tr>(.*?)</tr>", changed))}
  assert changed_rows["image_size"] == [str(config.image_size), "112"]
  assert changed_rows["data.dir"][0] == html_repr(config.data.dir)
  assert "loss.valence_weight" not in changed_rows
  assert "<th>loss.valence_weight</th><td>1.0</td>" in rest
  # Changed fields come first, the defaults after: every field once.
  fields = [f for f in re.findall(r"<tr><th>([a-z_.0-9]+)</th>", section)
            if f != "field"]
  assert len(fields) == len(set(fields))
  flat = json.loads(json.dumps(config.to_dict(), default=list))
  assert "model.kwargs.widths" in changed_rows and "seed" in fields
  assert len(fields) >= len(flat)


def html_repr(text):
  import html  # pylint: disable=g-import-not-at-top
  return html.escape(repr(text))
