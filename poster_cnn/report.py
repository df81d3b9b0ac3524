"""A run's report: plots plus the metrics table, as Markdown and HTML.

    poster-cnn --mode=report --workdir=RUN [--step=best] [--split=test]

Everything is drawn from files in the workdir: metrics.jsonl (training
curves) and the evaluation's `eval_<split>_step<N>.json`/`.npz` (evaluated
first if missing), so a report can be redrawn without the model. Output, in
`<workdir>/report_<split>_step<N>/`:

  training_curves.png   train loss, learning rate, img/s; validation mAP vs step
  per_genre_ap.png      AP per genre, with the label prior's AP as a marker
  pr_curves.png         precision-recall curve per genre, calibrated point marked
  cooccurrence.png      true vs predicted label co-occurrence
  report.md             the plots (linked) and the metrics tables
  report.html           the same, self-contained: plots embedded as base64 PNG

The functions computing what is drawn (`series`, `cooccurrence`,
`decisions`, `metrics.precision_recall_curve`) are pure; each `plot_*`
function only draws. matplotlib is imported inside the drawing functions,
so the rest of the package never needs it.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence

import numpy as np

from poster_cnn import evaluate, logs, metrics, train

PLOTS_HINT = "pip install 'poster_cnn[plots]'"

# (file name, title), in report order.
FIGURES = (
    ("training_curves.png", "Training curves"),
    ("per_genre_ap.png", "Average precision per genre"),
    ("pr_curves.png", "Precision-recall curves"),
    ("cooccurrence.png", "Label co-occurrence"),
)

_DPI = 100


class MatplotlibMissing(ImportError):
  """Raised when report mode runs without the `plots` extra installed."""


def require_matplotlib() -> None:
  """Fails early, before any evaluation, with the install command if matplotlib is absent."""
  try:
    import matplotlib  # noqa: F401
  except ImportError as e:
    raise MatplotlibMissing(f"report mode needs matplotlib: {PLOTS_HINT}") from e


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


# ---------------------------------------------------------------- drawing


def _figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas, without pyplot's global state."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise MatplotlibMissing(f"plots need matplotlib: {PLOTS_HINT}") from e
  fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _integer_ticks(axis) -> None:
  """Steps and counts are integers: no '2.5' ticks on short runs or small counts."""
  from matplotlib.ticker import MaxNLocator
  axis.set_major_locator(MaxNLocator(integer=True))


def _no_data(ax, text: str = "no data") -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")
  ax.set_xticks([])
  ax.set_yticks([])


_CURVE_LABELS = {"macro_map": "macro mAP", "micro_map": "micro mAP"}


def plot_training_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], eval_split: str,
                         path: str, evaluated_step: int | None = None) -> None:
  """2x2 panels: train loss, learning rate, img/s, and eval macro/micro mAP vs step.

  Args:
    curves: name -> (steps, values) for 'loss', 'learning_rate', 'images_per_s',
      'macro_map' and 'micro_map' (the last two on `eval_split`); see `series`.
    evaluated_step: the reported checkpoint, marked on the mAP panel.
  """
  fig = _figure(10, 6.5)
  axes = fig.subplots(2, 2, sharex=True)
  panels = [(axes[0, 0], "train loss", ["loss"]),
            (axes[0, 1], "learning rate", ["learning_rate"]),
            (axes[1, 0], "throughput (img/s)", ["images_per_s"]),
            (axes[1, 1], f"{eval_split} mAP", ["macro_map", "micro_map"])]
  for ax, title, names in panels:
    ax.set_title(title)
    drawn = False
    for name in names:
      steps, values = curves.get(name, (np.zeros(0), np.zeros(0)))
      if steps.size:
        ax.plot(steps, values, marker="o" if steps.size < 30 else None, ms=3,
                label=_CURVE_LABELS.get(name, name))
        drawn = True
    if not drawn:
      _no_data(ax)
      continue
    ax.grid(alpha=0.3)
  has_map = any(curves.get(name, (np.zeros(0),))[0].size for name in ("macro_map", "micro_map"))
  if evaluated_step is not None and has_map:
    axes[1, 1].axvline(evaluated_step, ls=":", color="0.4",
                       label=f"reported checkpoint (step {evaluated_step})")
  if has_map:
    axes[1, 1].legend(loc="best", fontsize=8)
    axes[1, 1].set_ylim(0, 1)
  # Learning rates are small numbers: scientific offsets keep the ticks short.
  axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
  for ax in axes[1]:
    ax.set_xlabel("step")
  _integer_ticks(axes[1, 0].xaxis)  # the x axis is shared
  fig.savefig(path)


def plot_per_genre_ap(vocabulary: Sequence[str], ap: np.ndarray, prior_ap: np.ndarray,
                      path: str) -> None:
  """Horizontal bars of AP per genre, best on top, with the label prior as a marker.

  Args:
    ap, prior_ap: float (K,), NaN for a genre without positives in the split.
  """
  k = len(vocabulary)
  order = np.argsort(np.where(np.isnan(ap), -1.0, ap), kind="stable")  # best ends on top
  fig = _figure(7, 1.2 + 0.32 * k)
  ax = fig.subplots()
  y = np.arange(k)
  ax.barh(y, np.nan_to_num(ap[order]), color="tab:blue", label="model AP")
  ax.scatter(prior_ap[order], y, marker="D", s=25, color="black", zorder=3,
             label="label prior AP (positive rate)")
  for yi, value in zip(y, ap[order]):
    ax.text(0.01 if np.isnan(value) else value + 0.01, yi,
            "no positives" if np.isnan(value) else f"{value:.2f}", va="center", fontsize=8)
  ax.set_yticks(y, [vocabulary[i] for i in order])
  ax.set_xlim(0, 1.1)
  ax.set_xlabel("average precision")
  ax.grid(axis="x", alpha=0.3)
  # Above the axes, where no bar can hide under it.
  ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
  fig.savefig(path)


def plot_pr_curves(vocabulary: Sequence[str], curves: list, ap: np.ndarray,
                   positive_rate: np.ndarray, operating_points: np.ndarray, path: str) -> None:
  """A grid of precision-recall curves, one panel per genre.

  Args:
    curves: K entries (precision, recall, thresholds) or None, as
      `metrics.precision_recall_curve`.
    ap: float (K,) AP, shown in each title.
    positive_rate: float (K,): the precision of guessing, drawn dashed.
    operating_points: float (K, 2) (recall, precision) at the calibrated
      thresholds, NaN where there are none.
  """
  k = len(vocabulary)
  cols = min(4, k)
  rows = math.ceil(k / cols)
  fig = _figure(2.6 * cols + 0.4, 2.4 * rows + 0.3)
  axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
  for c, ax in enumerate(axes):
    if c >= k:
      ax.set_visible(False)
      continue
    ax.set_title(f"{vocabulary[c]}" + ("" if np.isnan(ap[c]) else f"  AP {ap[c]:.2f}"),
                 fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if curves[c] is None:
      ax.text(0.5, 0.5, "no positives", ha="center", va="center", color="0.5")
      continue
    precision, recall, _ = curves[c]
    ax.plot(recall, precision, drawstyle="steps-post", color="tab:blue", lw=1.2)
    ax.axhline(positive_rate[c], ls="--", color="0.5", lw=0.8)
    r, p = operating_points[c]
    if not np.isnan(r):
      ax.plot([r], [p], "o", color="tab:red", ms=4)
  for ax in axes[(rows - 1) * cols:]:
    ax.set_xlabel("recall")
  for ax in axes[::cols]:
    ax.set_ylabel("precision")
  # Bottom panels hidden in a partial last row: give the panels above them x labels.
  for c in range(k, rows * cols):
    if c - cols >= 0:
      axes[c - cols].set_xlabel("recall")
      axes[c - cols].xaxis.set_tick_params(labelbottom=True)
  fig.suptitle("precision-recall per genre (dashed: positive rate; red dot: calibrated "
               "threshold)", fontsize=10)
  fig.savefig(path)


def plot_cooccurrence(vocabulary: Sequence[str], true: np.ndarray, predicted: np.ndarray,
                      rule: str, path: str) -> None:
  """Side-by-side heatmaps of true and predicted co-occurrence counts.

  Args:
    true, predicted: int (K, K) from `cooccurrence`.
    rule: how predictions were made, for the title.
  """
  k = len(vocabulary)
  off = ~np.eye(k, dtype=bool)
  # The diagonal (genre counts) would dwarf the pairs, so the shared colour
  # scale stops at the largest pair count; diagonal cells simply saturate.
  vmax = max(1, int(max(true[off].max(initial=0), predicted[off].max(initial=0))))
  side = 1.6 + 0.42 * k
  fig = _figure(2 * side + 1.0, side + 0.4)
  axes = fig.subplots(1, 2)
  for ax, counts, title in ((axes[0], true, "true labels"),
                            (axes[1], predicted, f"predicted ({rule})")):
    im = ax.imshow(counts, cmap="Blues", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(k), vocabulary, rotation=60, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_yticks(range(k), vocabulary, fontsize=8)
    if k <= 20:  # beyond that the numbers no longer fit in the cells
      for i in range(k):
        for j in range(k):
          dark = counts[i, j] > 0.6 * vmax
          ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                  color="white" if dark else "black")
  bar = fig.colorbar(im, ax=axes, shrink=0.8, label="examples (diagonal: genre count)")
  _integer_ticks(bar.ax.yaxis)
  fig.savefig(path)


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


def render_markdown(summary: dict, workdir: str, figures: Sequence[tuple[str, str]]) -> str:
  """report.md: tables from `evaluate`'s row builders, plots linked relatively."""
  parts = [f"# {_title(workdir)}", "", f"Workdir: `{os.path.abspath(workdir)}`", "",
           evaluate.describe(summary) + ".", "", "## Headline metrics", "",
           _markdown_table(*evaluate.headline_table(summary), align="lrlr"), "",
           "## Per genre", "", _markdown_table(*evaluate.per_class_table(summary),
                                                 align="lrrrrrrr"), ""]
  for name, title in figures:
    parts += [f"## {title}", "", f"![{title}]({name})", ""]
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
"""


def render_html(summary: dict, workdir: str, figures: Sequence[tuple[str, str]],
                image_dir: str) -> str:
  """report.html, self-contained: every PNG from `image_dir` embedded as base64.

  Each image also links to its PNG file beside the report.
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
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          + "\n".join(body) + "\n</body>\n</html>\n")


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


def _resolve_step(workdir: str, step: str | int) -> int:
  """A step number, opening the checkpoints only for 'best' or 'latest'."""
  if str(step).isdigit():
    return int(step)
  from poster_cnn import checkpoint
  manager = checkpoint.create_manager(workdir, read_only=True)
  try:
    return evaluate.resolve_step(manager, step)
  finally:
    manager.close()


def report_dir(workdir: str, split: str, step: int) -> str:
  return os.path.join(workdir, f"report_{split}_step{step}")


def write_report(workdir: str, *, step: str | int = "best", split: str | None = None,
                 data_dir: str | None = None) -> str | None:
  """Writes the report of a checkpoint's evaluation, evaluating first if needed.

  Every process takes part in a missing evaluation; only process 0 draws.

  Args:
    workdir: a training workdir.
    step: 'best', 'latest' or a step number.
    split: defaults to the config's test split.
    data_dir: dataset for a missing evaluation (default: the training dataset).

  Returns:
    The report directory (holding report.html, report.md and the PNGs) on
    process 0, None on the others.
  """
  import jax

  require_matplotlib()
  config, _ = train.read_run_info(workdir)
  split = split or config.test_split
  step = _resolve_step(workdir, step)
  if not all(os.path.exists(p) for p in evaluate.eval_paths(workdir, split, step)):
    evaluate.evaluate_checkpoint(workdir, step=step, split=split, data_dir=data_dir)
  if jax.process_index() != 0:
    return None
  summary, preds = evaluate.read_eval(workdir, split, step)
  rows = (logs.read_metrics(workdir)
          if os.path.exists(os.path.join(workdir, logs.METRICS_FILE)) else [])
  out_dir = report_dir(workdir, split, step)
  os.makedirs(out_dir, exist_ok=True)
  figures = draw_figures(summary, preds, rows, eval_split=config.eval_split,
                         top_k=config.top_k, out_dir=out_dir)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(render_markdown(summary, workdir, figures))
  with open(os.path.join(out_dir, "report.html"), "w") as f:
    f.write(render_html(summary, workdir, figures, out_dir))
  return out_dir
