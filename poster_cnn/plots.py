"""The report's plots: each `plot_*` function draws data it is given into a PNG file.

matplotlib is imported inside the drawing functions (the `plots` extra), so the
rest of the package never needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PLOTS_HINT = "pip install 'poster_cnn[plots]'"

_DPI = 100


class MatplotlibMissing(ImportError):
  """Raised when report mode runs without the `plots` extra installed."""


def require_matplotlib() -> None:
  """Fails early, before any evaluation, with the install command if matplotlib is absent."""
  try:
    import matplotlib  # noqa: F401
  except ImportError as e:
    raise MatplotlibMissing(f"report mode needs matplotlib: {PLOTS_HINT}") from e


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

