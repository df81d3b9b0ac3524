"""What a report shows besides its plots: the run, model, dataset and config, and a gallery.

The gallery puts posters in front of the reader: a sample of the evaluated split
with each poster's true genres and top predictions, then, per genre, the posters
the model scores highest. The selection (`gallery_indices`) is pure; the posters
come from the evaluated dataset's records and are embedded in the HTML.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np

from poster_cnn import logs


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, (list, tuple)):
    return ", ".join(_fmt(v) for v in value)
  return str(value)


def run_tables(info: dict, summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
  """[(title, header, rows)] for the run's model, datasets and full config.

  Args:
    info: the run info (`RunDir.read_info`).
    summary: the evaluation's summary (`evaluate.evaluate_checkpoint`).
  """
  config = info["config"]
  model = config.get("model", {})
  image = config.get("image", {})
  ckpt = summary.get("checkpoint") or {}
  name = model.get("name", "?")
  # The fields of the chosen architecture (default.py groups them under comments).
  own = {"paper_cnn": ("conv_features", "conv_dropout", "dense_features", "dense_dropout"),
         "resnet": ("stem_features", "stage_features", "blocks_per_stage", "head_dropout")}
  model_rows = [["architecture", name],
                ["input", f"{image.get('height')}x{image.get('width')} RGB, "
                          f"{image.get('resize', 'stretch')}"],
                ["compute dtype", str(config.get("dtype", "float32"))],
                *[[k, _fmt(model[k])] for k in own.get(name, sorted(model)) if k in model],
                ["weight average (ema_decay)", _fmt(config.get("ema_decay", 0.0))],
                ["optimizer", _fmt(config.get("optimizer", {}).get("name", "?"))],
                ["checkpoint", f"{ckpt.get('path', '?')} (step {summary.get('step', '?')})"]]
  trained_on = info.get("dataset") or {"path": config.get("data_dir", "?")}
  scored = summary.get("dataset") or {}
  splits = trained_on.get("splits")
  data_rows = [["trained on", str(trained_on.get("path"))],
               ["training splits", ", ".join(f"{k} {v}" for k, v in splits.items())
                if splits else "-"],
               ["genres (model)", ", ".join(info.get("vocabulary", []))],
               ["evaluated", f"{scored.get('path', trained_on.get('path'))}, split "
                             f"{summary.get('split', '?')} ({summary.get('num_examples', '?')} "
                             "posters)"],
               ["evaluated fingerprint", str(scored.get("fingerprint", "-"))],
               ["genres scored", ", ".join(summary.get("vocabulary", []))]]
  config_rows = [[k, _fmt(v)] for k, v in sorted(logs.flatten_config(config).items())]
  return [("Model", ["", ""], model_rows), ("Dataset", ["", ""], data_rows),
          ("Config", ["field", "value"], config_rows)]


def gallery_indices(scores: np.ndarray, *, sample: int = 12, per_genre: int = 4,
                    seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
  """Which rows the gallery shows.

  Args:
    scores: float (N, K) probabilities.

  Returns:
    (int (min(sample, N),) a random sample of rows, sorted; K arrays of the
    `per_genre` rows with the highest score of each genre, best first).
  """
  n, k = scores.shape
  chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
  best = [np.argsort(-scores[:, c], kind="stable")[:per_genre] for c in range(k)]
  return chosen, best


def _thumbnail(data: bytes, height: int = 150) -> str:
  """Encoded poster -> a base64 JPEG data URI about `height` pixels high."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as img:
    img = img.convert("RGB")
    img.thumbnail((height * 2, height))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(example: dict, scores: np.ndarray, labels: np.ndarray,
          vocabulary: Sequence[str], top: int, highlight: int | None = None) -> str:
  true = [vocabulary[c] for c in np.flatnonzero(labels)]
  order = np.argsort(-scores, kind="stable")[:top]
  preds = "".join(
      f'<li class="{"hit" if labels[c] else "miss"}">{html.escape(vocabulary[c])} '
      f"{scores[c]:.2f}</li>" for c in order)
  title = example.get("title") or example.get("id", "")
  score = (f'<div class="score">{html.escape(vocabulary[highlight])}: '
           f"{scores[highlight]:.2f} {'(true)' if labels[highlight] else '(not true)'}</div>"
           if highlight is not None else "")
  return (f'<div class="card"><img src="{_thumbnail(example["image"])}" '
          f'alt="{html.escape(str(example.get("id", "")))}">'
          f'<div class="title">{html.escape(str(title))}</div>{score}'
          f'<div class="true">true: {html.escape(", ".join(true) or "-")}</div>'
          f"<ol>{preds}</ol></div>")


GALLERY_CSS = """
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 0.5em 0 1.5em; }
.card { width: 170px; font-size: 0.8em; }
.card img { height: 150px; max-width: 170px; object-fit: contain; display: block; }
.card ol { margin: 0.2em 0; padding-left: 1.4em; }
.card .title { font-weight: bold; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
li.hit { color: #1a7f37; } li.miss { color: #888; }
"""


def gallery_html(examples: dict[int, dict], scores: np.ndarray, labels: np.ndarray,
                 vocabulary: Sequence[str], sample: np.ndarray, best: list[np.ndarray],
                 top: int = 3) -> str:
  """The gallery's HTML: posters embedded as JPEG data URIs.

  Args:
    examples: row -> {'image' (encoded bytes), 'id', 'title'} for every row shown.
    scores, labels: float (N, K), {0, 1} (N, K), columns in `vocabulary` order.
    sample, best: from `gallery_indices`.
  """
  def cards(rows, highlight=None):
    return ('<div class="gallery">' + "".join(
        _card(examples[int(r)], scores[r], labels[r], vocabulary, top, highlight)
        for r in rows) + "</div>")

  parts = ["<h2>Gallery</h2>",
           f"<p>A sample of {len(sample)} posters: true genres, then the top {top} "
           "predictions (green: a true genre).</p>", cards(sample),
           "<h3>Highest-scoring posters per genre</h3>"]
  for c, rows in enumerate(best):
    parts += [f"<h4>{html.escape(vocabulary[c])}</h4>", cards(rows, highlight=c)]
  return "\n".join(parts)
