"""A run's report: plots plus the metrics table, as Markdown and HTML.

    poster-cnn --mode=report --workdir=RUN [--step=best] [--split=test]

Everything is drawn from files in the workdir: metrics.jsonl (training
curves) and the evaluation's `<split>_step<N>.json`/`.npz` (evaluated first
if missing), so a report can be redrawn without the model. Output, in
`<workdir>/reports/<dataset>/<split>_step<N>/`:

  training_curves.png   train loss, learning rate, img/s; validation mAP vs step
  per_genre_ap.png      AP per genre, with the label prior's AP as a marker
  pr_curves.png         precision-recall curve per genre, calibrated point marked
  cooccurrence.png      true vs predicted label co-occurrence
  report.md             the plots (linked) and the metrics tables
  report.html           the same, self-contained: plots embedded as base64 PNG

The functions computing what is drawn (`series`, `cooccurrence`,
`decisions`, `metrics.precision_recall_curve`) are pure; each `plot_*`
function (poster_cnn/plots.py) only draws. matplotlib is imported inside the
drawing functions, so the rest of the package never needs it. The model,
dataset, config and poster gallery sections come from report_sections.py.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence

import numpy as np

from poster_cnn import evaluate, logs, metrics, report_sections, run_dir
from poster_cnn.plots import (MatplotlibMissing, plot_cooccurrence, plot_per_genre_ap,  # noqa: F401
                              plot_pr_curves, plot_training_curves, require_matplotlib)
from poster_cnn.run_dir import RunDir

# (file name, title), in report order.
FIGURES = (
    ("training_curves.png", "Training curves"),
    ("per_genre_ap.png", "Average precision per genre"),
    ("pr_curves.png", "Precision-recall curves"),
    ("cooccurrence.png", "Label co-occurrence"),
)


# ---------------------------------------------------------------- data (pure)


def series(rows: Sequence[dict], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """One metric over steps from metrics.jsonl rows.

  Args:
    rows: {"step", "split", "time", name: value} dicts (`logs.read_metrics`);
      non-finite values are logged as strings ("nan", "inf").
    split: 'train' or an evaluation split.
    name: the metric.

  Returns:
    (steps int64 (n,), values float64 (n,)), sorted by step. A resumed run
    logs some steps again; the last row for a step wins, being the one the
    final model descends from.
  """
  by_step = {int(r["step"]): float(r[name]) for r in rows
             if r.get("split") == split and name in r}
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def cooccurrence(labels) -> np.ndarray:
  """How often each pair of genres occurs together.

  Args:
    labels: {0, 1} or bool (N, K), true labels or predictions.

  Returns:
    int64 (K, K), symmetric: [i, j] examples with both genres i and j; the
    diagonal holds each genre's count.
  """
  y = np.asarray(labels)
  if y.ndim != 2:
    raise ValueError(f"labels must be 2-D (N, K), got shape {y.shape}")
  y = y.astype(np.int64)
  return y.T @ y


def decisions(scores, thresholds=None, k: int = 2) -> tuple[np.ndarray, str]:
  """The predicted label sets a co-occurrence plot shows.

  Args:
    scores: float (N, K) probabilities.
    thresholds: float (K,) calibrated thresholds, or None to fall back on
      the top-k rule.
    k: classes per example for the top-k rule.

  Returns:
    (bool (N, K) predictions, a short description of the rule).
  """
  if thresholds is None:
    return metrics.top_k_predictions(scores, k), f"top-{k}"
  t = np.asarray(thresholds, np.float64)
  return np.asarray(scores) >= t, "calibrated thresholds"


def _floats(values, k: int) -> np.ndarray:
  """JSON list (None for undefined) or missing -> float64 (k,) with NaN."""
  if values is None:
    return np.full(k, np.nan)
  return np.array([np.nan if v is None else v for v in values], np.float64)


# ---------------------------------------------------------------- documents


def _markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
  rule = ["---:" if a == "r" else ":---" for a in align]
  lines = [header, rule, *rows]
  return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _html_table(header: list[str], rows: list[list[str]], align: str) -> str:
  def row(cells, tag):
    return "<tr>" + "".join(
        f'<{tag} class="{"num" if a == "r" else "txt"}">{html.escape(c)}</{tag}>'
        for c, a in zip(cells, align)) + "</tr>"
  return ("<table>\n<thead>" + row(header, "th") + "</thead>\n<tbody>\n"
          + "\n".join(row(r, "td") for r in rows) + "\n</tbody>\n</table>")


def _title(workdir: str) -> str:
  return f"poster_cnn report: {os.path.basename(os.path.normpath(workdir))}"


def render_markdown(summary: dict, workdir: str, figures: Sequence[tuple[str, str]],
                    tables: Sequence[tuple[str, list[str], list[list[str]]]] = ()) -> str:
  """report.md: tables from `evaluate`'s row builders, plots linked relatively.

  `tables`: further (title, header, rows) sections (`report_sections.run_tables`).
  """
  parts = [f"# {_title(workdir)}", "", f"Workdir: `{os.path.abspath(workdir)}`", "",
           evaluate.describe(summary) + ".", "", "## Headline metrics", "",
           _markdown_table(*evaluate.headline_table(summary), align="lrlr"), "",
           "## Per genre", "", _markdown_table(*evaluate.per_class_table(summary),
                                                 align="lrrrrrrr"), ""]
  for name, title in figures:
    parts += [f"## {title}", "", f"![{title}]({name})", ""]
  for title, header, rows in tables:
    parts += [f"## {title}", "", _markdown_table(header, rows, align="ll"), ""]
  parts += ["The poster gallery is in report.html.", ""]
  return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }
th { background: #f4f4f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.txt, th.txt { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 0 0 2em; }
code { background: #f4f4f4; padding: 0 0.2em; }
details > summary h2 { display: inline; }
"""


def render_html(summary: dict, workdir: str, figures: Sequence[tuple[str, str]],
                image_dir: str, tables: Sequence[tuple[str, list[str], list[list[str]]]] = (),
                gallery: str = "") -> str:
  """report.html, self-contained: every PNG from `image_dir` embedded as base64.

  Each image also links to its PNG file beside the report. `tables` as in
  `render_markdown` (the config's in a collapsed section); `gallery` is HTML
  (`report_sections.gallery_html`).
  """
  title = html.escape(_title(workdir))
  body = [f"<h1>{title}</h1>",
          f"<p>Workdir: <code>{html.escape(os.path.abspath(workdir))}</code></p>",
          f"<p>{html.escape(evaluate.describe(summary))}.</p>",
          "<h2>Headline metrics</h2>",
          _html_table(*evaluate.headline_table(summary), align="lrlr"),
          "<h2>Per genre</h2>",
          _html_table(*evaluate.per_class_table(summary), align="lrrrrrrr")]
  for name, caption in figures:
    with open(os.path.join(image_dir, name), "rb") as f:
      data = base64.b64encode(f.read()).decode("ascii")
    body += [f"<h2>{html.escape(caption)}</h2>",
             f'<figure><a href="{name}"><img src="data:image/png;base64,{data}" '
             f'alt="{html.escape(caption)} ({name})"></a></figure>']
  body.append(gallery)
  for name, header, rows in tables:
    table = _html_table(header, rows, align="ll")
    body.append(f"<details><summary><h2>{html.escape(name)}</h2></summary>{table}</details>"
                if name == "Config" else f"<h2>{html.escape(name)}</h2>{table}")
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{title}</title>\n<style>{_CSS}{report_sections.GALLERY_CSS}</style>\n"
          "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


# ---------------------------------------------------------------- the run


def draw_figures(summary: dict, preds: dict, rows: Sequence[dict], *, eval_split: str,
                 top_k: int, out_dir: str) -> list[tuple[str, str]]:
  """Computes each plot's data and draws it into `out_dir`; returns FIGURES."""
  vocabulary = summary["vocabulary"]
  k = len(vocabulary)
  scores, labels = preds["scores"], preds["labels"]
  ap = _floats(summary["per_class_ap"], k)
  positive_rate = labels.mean(0) if len(labels) else np.full(k, np.nan)
  # Constant scores tie every example, so the prior's AP is the positive rate;
  # summaries from before 'per_class_prior_ap' existed fall back on that.
  prior_ap = (_floats(summary["per_class_prior_ap"], k) if "per_class_prior_ap" in summary
              else positive_rate)
  thresholds = summary.get("per_class_threshold")
  thresholds = None if thresholds is None or None in thresholds else thresholds
  operating = np.stack([_floats(summary.get("per_class_recall_calibrated"), k),
                        _floats(summary.get("per_class_precision_calibrated"), k)], axis=1)

  curves = {name: series(rows, "train", name)
            for name in ("loss", "learning_rate", "images_per_s")}
  curves.update({name: series(rows, eval_split, name) for name in ("macro_map", "micro_map")})
  pred, rule = decisions(scores, thresholds, top_k)
  paths = {name: os.path.join(out_dir, name) for name, _ in FIGURES}
  plot_training_curves(curves, eval_split, paths["training_curves.png"],
                       evaluated_step=summary.get("step"))
  plot_per_genre_ap(vocabulary, ap, prior_ap, paths["per_genre_ap.png"])
  plot_pr_curves(vocabulary, metrics.precision_recall_curve(scores, labels), ap, positive_rate,
                 operating, paths["pr_curves.png"])
  plot_cooccurrence(vocabulary, cooccurrence(labels), cooccurrence(pred), rule,
                    paths["cooccurrence.png"])
  return list(FIGURES)


def _gallery(summary: dict, preds: dict, data_dir: str, split: str) -> str:
  """The gallery's HTML, or a line saying why it is left out (the dataset is gone)."""
  from poster_cnn import inference
  data_dir = (summary.get("dataset") or {}).get("path") or data_dir
  if not len(preds["scores"]):
    return ""
  sample, best = report_sections.gallery_indices(preds["scores"])
  rows = sorted({int(r) for r in sample} | {int(r) for b in best for r in b})
  try:
    found = inference.read_examples(data_dir, split, preds["index"][rows])
  except (OSError, ValueError) as e:
    return f"<h2>Gallery</h2><p>Left out: the posters of {html.escape(data_dir)} could not " \
           f"be read ({html.escape(str(e))}).</p>"
  return report_sections.gallery_html(dict(zip(rows, found)), preds["scores"], preds["labels"],
                                      summary["vocabulary"], sample, best)


def write_report(workdir, *, step: str | int = "best", split: str | None = None,
                 data_dir: str | None = None) -> str | None:
  """Writes the report of a checkpoint's evaluation, evaluating first if needed.

  Every process takes part in a missing evaluation; only process 0 draws.

  Args:
    workdir: a training workdir (path or `run_dir.RunDir`).
    step: 'best', 'latest' or a step number.
    split: defaults to the config's test split.
    data_dir: the evaluated dataset (default: the training dataset).

  Returns:
    The report directory (holding report.html, report.md and the PNGs) on
    process 0, None on the others: WORKDIR/reports/<dataset>/<split>_step<N>/.
  """
  import jax

  require_matplotlib()
  run = workdir if isinstance(workdir, RunDir) else RunDir(workdir)
  config = run.config()
  split = split or config.test_split
  step = run.resolve_step(step, require_checkpoint=False)
  stem = evaluate.output_stem(run, config, step=step, split=split, data_dir=data_dir)
  if not run_dir.evaluation_exists(stem):
    evaluate.evaluate_checkpoint(run, step=step, split=split, data_dir=data_dir)
  if jax.process_index() != 0:
    return None
  summary, preds = run_dir.read_evaluation(stem)
  rows = logs.read_metrics(run.path) if run.metrics_file.exists() else []
  out_dir = run.report(stem)
  out_dir.mkdir(parents=True, exist_ok=True)
  out_dir = os.fspath(out_dir)
  figures = draw_figures(summary, preds, rows, eval_split=config.eval_split,
                         top_k=config.top_k, out_dir=out_dir)
  workdir = os.fspath(run.path)
  tables = report_sections.run_tables(run.read_info(), summary)
  gallery = _gallery(summary, preds, data_dir or config.data_dir, split)
  run_dir.atomic_write_bytes(os.path.join(out_dir, "report.md"),
                             render_markdown(summary, workdir, figures, tables).encode())
  run_dir.atomic_write_bytes(os.path.join(out_dir, "report.html"),
                             render_html(summary, workdir, figures, out_dir, tables,
                                         gallery).encode())
  return out_dir
