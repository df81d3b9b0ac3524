"""Report mode end to end (a tiny trained run, via the CLI), its files, and its pure helpers."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from poster_cnn import evaluate, metrics, report
from poster_cnn.run_dir import RunDir


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["red", "green", "blue", "bright"]  # conftest's tiny_dataset
STEP = 6  # configs/tiny.py trains 6 steps


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "poster_cnn.main", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def reported(tiny_dataset, tmp_path_factory):
  """A trained tiny run, then report mode on it: no evaluation exists yet, so it runs one.

  Returns (workdir, report directory, report mode's stdout).
  """
  workdir = tmp_path_factory.mktemp("run")
  _run("--config=configs/tiny.py", f"--config.data_dir={tiny_dataset}", f"--workdir={workdir}")
  out = _run("--mode=report", f"--workdir={workdir}", "--step=latest").stdout
  run = RunDir(workdir)
  return workdir, run.report(run.evaluation(tiny_dataset, "test", STEP)), out


def test_report_draws_every_plot(reported):
  _, out_dir, stdout = reported
  assert str(out_dir / "report.html") in stdout
  for name, _ in report.FIGURES:
    with Image.open(out_dir / name) as im:
      assert im.format == "PNG"
      width, height = im.size
      pixels = np.asarray(im.convert("L"), np.float32)
    assert 300 <= width <= 3000 and 150 <= height <= 3000, (name, im.size)
    assert pixels.var() > 0, f"{name} is blank"


def test_report_documents_show_every_plot_and_the_metrics(reported):
  workdir, out_dir, _ = reported
  summary, _ = evaluate.read_eval(str(workdir), "test", STEP)
  macro = f"{summary['macro_map']:.4f}"
  md = (out_dir / "report.md").read_text()
  page = (out_dir / "report.html").read_text()
  for name, _ in report.FIGURES:
    assert f"]({name})" in md
    assert f'href="{name}"' in page
  # Self-contained: every image is embedded, none is only linked.
  assert page.count('src="data:image/png;base64,') == len(report.FIGURES)
  for text in (md, page):
    assert macro in text and "label prior macro mAP" in text
    assert all(genre in text for genre in VOCAB)


def test_report_shows_the_run_model_dataset_config_and_a_gallery(reported):
  workdir, out_dir, _ = reported
  page = (out_dir / "report.html").read_text()
  md = (out_dir / "report.md").read_text()
  for section in ("Model", "Dataset", "Config"):
    assert f"<h2>{section}</h2>" in page and f"## {section}" in md
  assert "paper_cnn" in page and "conv_features" in page and "optimizer.learning_rate" in page
  assert str(workdir / "checkpoints" / str(STEP)) in page
  # 12 sampled test posters, then the 4 highest-scoring of each of the 4 genres.
  assert page.count('<div class="card">') == 12 + 4 * 4
  assert page.count('src="data:image/jpeg;base64,') == 12 + 4 * 4
  assert page.count('<li class="hit">') + page.count('<li class="miss">') == 3 * (12 + 16)


def _chromium() -> str | None:
  return next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                              "google-chrome"))), None)


@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_a_headless_browser_with_every_image_loaded(reported, tmp_path):
  _, out_dir, _ = reported
  # After the page loads, a probe records how many images decoded (naturalWidth > 0).
  probe = (out_dir / "report.html").read_text().replace("</body>", """<script>
    window.addEventListener("load", () => {
      const images = [...document.images];
      const ok = images.filter(i => i.complete && i.naturalWidth > 0);
      document.body.setAttribute("data-images", images.length + " " + ok.length);
    });</script></body>""")
  page = tmp_path / "probe.html"
  page.write_text(probe)
  proc = subprocess.run(
      [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
       f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
       page.as_uri()], capture_output=True, text=True, timeout=120)
  found = re.search(r'data-images="(\d+) (\d+)"', proc.stdout)
  assert found, proc.stderr[-2000:]
  total, loaded = map(int, found.groups())
  assert total == len(report.FIGURES) + 12 + 4 * 4 and loaded == total


def test_evaluation_saves_per_class_fields_and_predictions(reported):
  workdir, _, _ = reported
  summary, preds = evaluate.read_eval(str(workdir), "test", STEP)
  assert summary["vocabulary"] == VOCAB and summary["calibration_split"] == "validation"
  for key in ("per_class_positives", "per_class_prior_ap", "per_class_threshold",
              "per_class_precision_calibrated", "per_class_recall_calibrated",
              "per_class_f1_calibrated"):
    assert isinstance(summary[key], list) and len(summary[key]) == len(VOCAB), key

  # The NPZ round-trips: the raw predictions reproduce the JSON's metrics.
  assert preds["scores"].dtype == np.float32 and preds["scores"].shape == (24, 4)
  assert preds["labels"].dtype == np.uint8 and preds["labels"].shape == (24, 4)
  np.testing.assert_array_equal(preds["index"], np.arange(24))
  assert summary["per_class_positives"] == preds["labels"].sum(0).tolist()
  assert summary["macro_map"] == metrics.mean_average_precision(preds["scores"], preds["labels"])
  thresholds = json.loads((workdir / f"thresholds_step_{STEP}.json").read_text())
  assert summary["per_class_threshold"] == [thresholds[g] for g in VOCAB]
  f1 = metrics.f1_at_thresholds(preds["scores"], preds["labels"],
                                summary["per_class_threshold"])["f1"]
  np.testing.assert_allclose([np.nan if v is None else v for v in
                              summary["per_class_f1_calibrated"]], f1)

  table = evaluate.format_report(summary)
  assert all(genre in table for genre in VOCAB) and "label prior micro mAP" in table
  assert "the paper's metric" in table and "no genre at all" in table


def test_report_is_redrawn_without_the_model(reported, tmp_path):
  workdir, _, _ = reported
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints", "reports"))
  out_dir = report.write_report(str(copy), step=STEP)
  assert sorted(os.listdir(out_dir)) == sorted(
      [name for name, _ in report.FIGURES] + ["report.md", "report.html"])


def test_missing_matplotlib_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
  with pytest.raises(report.MatplotlibMissing, match=r"pip install 'poster_cnn\[plots\]'"):
    report.require_matplotlib()


# ---------------------------------------------------------------- pure helpers


def test_cooccurrence_hand_case():
  labels = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8)
  np.testing.assert_array_equal(report.cooccurrence(labels),
                                [[3, 2, 1], [2, 2, 1], [1, 1, 1]])
  assert report.cooccurrence(labels.astype(bool)).dtype == np.int64
  with pytest.raises(ValueError, match="2-D"):
    report.cooccurrence(labels[0])


def test_decisions_use_thresholds_else_top_k():
  scores = np.array([[0.9, 0.6, 0.1], [0.2, 0.3, 0.4]], np.float32)
  pred, rule = report.decisions(scores, [0.5, 0.7, 0.4])
  np.testing.assert_array_equal(pred, [[1, 0, 0], [0, 0, 1]])
  assert rule == "calibrated thresholds"
  pred, rule = report.decisions(scores, None, k=2)
  np.testing.assert_array_equal(pred, [[1, 1, 0], [0, 1, 1]])
  assert rule == "top-2"


def test_series_filters_sorts_and_keeps_the_last_row_of_a_step():
  rows = [{"step": 4, "split": "train", "loss": 0.5},
          {"step": 2, "split": "train", "loss": 0.9},
          {"step": 2, "split": "validation", "macro_map": 0.3},
          {"step": 4, "split": "train", "loss": "nan"},  # a resumed run logged step 4 again
          {"step": 6, "split": "train", "grad_norm": 1.0}]
  steps, values = report.series(rows, "train", "loss")
  np.testing.assert_array_equal(steps, [2, 4])
  np.testing.assert_array_equal(values, [0.9, np.nan])
  steps, values = report.series(rows, "validation", "macro_map")
  assert steps.tolist() == [2] and values.tolist() == [0.3]
  steps, values = report.series([], "train", "loss")
  assert steps.dtype == np.int64 and steps.size == values.size == 0
