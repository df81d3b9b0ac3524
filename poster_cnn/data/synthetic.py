"""A synthetic movie-poster collection in the Kaggle layout, for demos and tests.

    poster-cnn-synthesize --out_dir=runs/demo/posters --num_posters=3000

writes `<out_dir>/posters/<imdbId>.jpg` (RGB JPEG, 2:3 like real posters) and
`<out_dir>/MovieGenre.csv` with the Kaggle columns
`imdbId,Imdb Link,Title,IMDB Score,Genre,Poster`, genres pipe-separated.

Labels: 1-3 genres per poster from skewed marginals (Drama and Comedy common,
Short and Animation rare), later genres drawn in proportion to how often they
co-occur with those already chosen (Action with Adventure/Thriller/Sci-Fi,
Romance with Drama/Comedy, Horror with Thriller/Mystery, ...), so that label
statistics resemble IMDb's.

Images: each genre leaves a signature (a palette tint, a motif such as stars,
bars, rings or diagonal streaks, and a place where the motif tends to sit),
drawn at a random size and position and partly transparent, on a background
blended from the genres' tints. Random clutter (blocks, lines, text-like
rows), faint decoys of other genres' motifs and pixel noise are added, so a
CNN can learn genres, but not from a single pixel statistic.

Deterministic: poster i is drawn from a generator seeded by (seed, i), so the
output is identical whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Drama", "Fantasy",
          "Horror", "Mystery", "Romance", "Sci-Fi", "Short", "Thriller")
CSV_NAME = "MovieGenre.csv"
CSV_HEADER = ("imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster")

# How often each genre is drawn first (relative), roughly IMDb's shape.
_MARGINAL = np.array([14, 9, 4, 35, 12, 45, 6, 10, 7, 14, 6, 3, 15], np.float64)
_MARGINAL /= _MARGINAL.sum()

# Symmetric affinities between genres (1 = independent).
_PAIRS = {("Action", "Adventure"): 12, ("Action", "Thriller"): 5, ("Action", "Sci-Fi"): 5,
          ("Action", "Crime"): 4, ("Adventure", "Fantasy"): 5, ("Adventure", "Animation"): 5,
          ("Animation", "Comedy"): 4, ("Comedy", "Romance"): 5, ("Drama", "Romance"): 5,
          ("Crime", "Thriller"): 5, ("Crime", "Drama"): 4, ("Horror", "Thriller"): 6,
          ("Horror", "Mystery"): 5, ("Mystery", "Thriller"): 5, ("Fantasy", "Sci-Fi"): 3,
          ("Short", "Animation"): 6, ("Short", "Comedy"): 3, ("Drama", "Comedy"): 0.6,
          ("Horror", "Romance"): 0.2, ("Animation", "Horror"): 0.2, ("Comedy", "Horror"): 0.5}
_AFFINITY = np.ones((len(GENRES), len(GENRES)))
for (a, b), w in _PAIRS.items():
  i, j = GENRES.index(a), GENRES.index(b)
  _AFFINITY[i, j] = _AFFINITY[j, i] = w

# Per genre: tint (RGB), motif, and where it sits (x, y centre as fractions of the poster).
_STYLE = {
    "Action": ((235, 110, 30), "streaks", (0.5, 0.5)),
    "Adventure": ((40, 150, 90), "mountains", (0.5, 0.85)),
    "Animation": ((255, 60, 200), "bubbles", (0.5, 0.4)),
    "Comedy": ((250, 220, 40), "sun", (0.7, 0.25)),
    "Crime": ((90, 90, 100), "bars", (0.5, 0.5)),
    "Drama": ((60, 90, 160), "gradient", (0.5, 0.5)),
    "Fantasy": ((150, 60, 220), "stars", (0.5, 0.3)),
    "Horror": ((150, 0, 0), "drips", (0.5, 0.1)),
    "Mystery": ((20, 40, 90), "rings", (0.5, 0.55)),
    "Romance": ((240, 120, 160), "hearts", (0.5, 0.45)),
    "Sci-Fi": ((0, 220, 230), "grid", (0.5, 0.7)),
    "Short": ((250, 250, 250), "frame", (0.5, 0.5)),
    "Thriller": ((200, 200, 200), "split", (0.5, 0.5)),
}

_WORDS = ("Night", "Last", "City", "Love", "Dark", "Road", "Secret", "Summer", "Blood",
          "Star", "House", "Dream", "Wild", "Lost", "Kings", "Shadow", "River", "Fire",
          "Heart", "Machine", "Ghost", "Winter", "Island", "Storm", "Garden", "Game")


def sample_labels(rng: np.random.Generator, n: int) -> np.ndarray:
  """Multi-hot genre labels, uint8 (n, 13) in GENRES order, 1-3 genres each."""
  labels = np.zeros((n, len(GENRES)), np.uint8)
  for row in labels:
    count = rng.choice([1, 2, 3], p=[0.4, 0.38, 0.22])
    weights = _MARGINAL.copy()
    for _ in range(count):
      p = weights * (1 - row)
      g = rng.choice(len(GENRES), p=p / p.sum())
      row[g] = 1
      weights = weights * _AFFINITY[g]
  return labels


def _motif(draw: ImageDraw.ImageDraw, kind: str, color, rng: np.random.Generator,
           w: int, h: int, centre: tuple[float, float], scale: float, alpha: int) -> None:
  """Draws one genre motif around `centre` (fractions), `scale` relative to the width."""
  cx = (centre[0] + rng.normal(0, 0.12)) * w
  cy = (centre[1] + rng.normal(0, 0.12)) * h
  s = max(3.0, scale * w)
  fill = (*color, alpha)
  line = max(1, round(w / 40))
  if kind == "streaks":
    for _ in range(5):
      x0 = cx + rng.uniform(-s, s)
      y0 = cy + rng.uniform(-s, s)
      draw.line([(x0, y0), (x0 + s, y0 - s * 0.8)], fill=fill, width=line + 1)
  elif kind == "mountains":
    for _ in range(3):
      x = cx + rng.uniform(-s, s)
      draw.polygon([(x - s * 0.7, h), (x, cy - s * 0.6), (x + s * 0.7, h)], fill=fill)
  elif kind == "bubbles":
    for _ in range(7):
      x, y, r = cx + rng.uniform(-s, s), cy + rng.uniform(-s, s), rng.uniform(0.1, 0.3) * s
      draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
  elif kind == "sun":
    r = 0.45 * s
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif kind == "bars":
    for k in range(-3, 4):
      x = cx + k * s * 0.25
      draw.line([(x, cy - s), (x, cy + s)], fill=fill, width=line + 1)
  elif kind == "gradient":
    for k in range(8):
      y = cy - s + k * s / 4
      draw.rectangle([0, y, w, y + s / 8], fill=(*color, alpha // (k + 1)))
  elif kind == "stars":
    for _ in range(5):
      x, y, r = cx + rng.uniform(-s, s), cy + rng.uniform(-s, s), rng.uniform(0.1, 0.25) * s
      pts = [(x + r * (1 if k % 2 == 0 else 0.4) * np.cos(k * np.pi / 5 - np.pi / 2),
              y + r * (1 if k % 2 == 0 else 0.4) * np.sin(k * np.pi / 5 - np.pi / 2))
             for k in range(10)]
      draw.polygon(pts, fill=fill)
  elif kind == "drips":
    for _ in range(6):
      x = rng.uniform(0, w)
      draw.line([(x, 0), (x, rng.uniform(0.2, 0.6) * h)], fill=fill, width=line + 1)
  elif kind == "rings":
    for k in range(1, 5):
      r = k * s * 0.2
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=line)
  elif kind == "hearts":
    for _ in range(3):
      x, y, r = cx + rng.uniform(-s, s), cy + rng.uniform(-s, s), rng.uniform(0.12, 0.25) * s
      draw.ellipse([x - 2 * r, y - r, x, y + r], fill=fill)
      draw.ellipse([x, y - r, x + 2 * r, y + r], fill=fill)
      draw.polygon([(x - 2 * r, y + r * 0.2), (x + 2 * r, y + r * 0.2), (x, y + 2.2 * r)],
                   fill=fill)
  elif kind == "grid":
    step = max(3.0, s / 4)
    for k in range(-4, 5):
      draw.line([(cx + k * step, cy - s), (cx + k * step, cy + s)], fill=fill, width=line)
      draw.line([(cx - s, cy + k * step), (cx + s, cy + k * step)], fill=fill, width=line)
  elif kind == "frame":
    b = max(2, round(w * rng.uniform(0.04, 0.08)))
    draw.rectangle([0, 0, w - 1, h - 1], outline=fill, width=b)
  elif kind == "split":
    draw.polygon([(0, h), (w, 0), (w, h)], fill=(0, 0, 0, alpha))
    draw.line([(0, h), (w, 0)], fill=fill, width=line + 1)
  else:
    raise ValueError(f"unknown motif {kind!r}")


def render_poster(labels: np.ndarray, rng: np.random.Generator, width: int) -> Image.Image:
  """An RGB poster (width x 1.5 width) carrying the signatures of `labels` (13,) multi-hot."""
  w, h = width, round(1.5 * width)
  genres = [GENRES[i] for i in np.flatnonzero(labels)]
  tints = np.array([_STYLE[g][0] for g in genres], np.float64)
  background = 0.5 * tints.mean(0) + 0.5 * rng.uniform(0, 255, 3)
  # A vertical gradient between two jittered versions of the background.
  top, bottom = (np.clip(background + rng.normal(0, 40, 3), 0, 255) for _ in range(2))
  t = np.linspace(0, 1, h)[:, None, None]
  base = (1 - t) * top + t * bottom
  img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8)).convert("RGBA")
  layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
  draw = ImageDraw.Draw(layer)
  # Clutter first, so motifs sit over it.
  for _ in range(rng.integers(3, 8)):
    x, y = rng.uniform(0, w), rng.uniform(0, h)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.rectangle([x, y, x + rng.uniform(0.1, 0.5) * w, y + rng.uniform(0.05, 0.3) * h],
                     fill=(*color, int(rng.integers(60, 160))))
    else:
      draw.line([(x, y), (rng.uniform(0, w), rng.uniform(0, h))],
                fill=(*color, int(rng.integers(80, 200))), width=int(rng.integers(1, 3)))
  # Title-like rows of blocks near the top or bottom.
  ty = rng.choice([0.06, 0.88]) * h
  for k in range(int(rng.integers(4, 9))):
    x = w * (0.1 + 0.1 * k) + rng.normal(0, 1)
    draw.rectangle([x, ty, x + w * 0.07, ty + h * 0.04], fill=(240, 240, 240, 200))
  # Faint decoys: one or two motifs of genres the poster does not have.
  absent = [g for g in GENRES if g not in genres]
  for g in rng.choice(absent, size=int(rng.integers(1, 3)), replace=False):
    color, kind, centre = _STYLE[g]
    _motif(draw, kind, color, rng, w, h, (rng.random(), rng.random()), rng.uniform(0.15, 0.3),
           alpha=int(rng.integers(40, 90)))
  for g in genres:
    color, kind, centre = _STYLE[g]
    _motif(draw, kind, color, rng, w, h, centre, rng.uniform(0.25, 0.45),
           alpha=int(rng.integers(150, 240)))
  img = Image.alpha_composite(img, layer).convert("RGB")
  pixels = np.asarray(img, np.float32) + rng.normal(0, 12, (h, w, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _title(rng: np.random.Generator) -> str:
  words = rng.choice(_WORDS, size=int(rng.integers(1, 4)), replace=False)
  title = " ".join(words)
  return f"{title}, Part {rng.integers(2, 5)}" if rng.random() < 0.1 else title


def _poster_row(args) -> tuple[str, ...]:
  """Renders and writes poster `index`; returns its CSV row."""
  index, poster_id, seed, width, quality, image_dir = args
  rng = np.random.default_rng([seed, index])
  labels = sample_labels(rng, 1)[0]
  image = render_poster(labels, rng, width)
  buf = io.BytesIO()
  image.save(buf, "JPEG", quality=quality)
  (Path(image_dir) / f"{poster_id}.jpg").write_bytes(buf.getvalue())
  genres = "|".join(GENRES[i] for i in np.flatnonzero(labels))
  score = f"{np.clip(rng.normal(6.3, 1.1), 1.0, 9.8):.1f}"
  return (str(poster_id), f"http://www.imdb.com/title/tt{poster_id:07d}", _title(rng), score,
          genres, f"https://images-na.ssl-images-amazon.com/images/M/{poster_id}.jpg")


def generate(out_dir: str | os.PathLike, num_posters: int, *, seed: int = 0, width: int = 96,
             jpeg_quality: int = 90, num_workers: int = 1, overwrite: bool = False) -> Path:
  """Writes `num_posters` synthetic posters and their CSV; returns the CSV's path.

  The CSV is written last, through a temporary file, so an interrupted run
  never leaves a CSV naming posters that do not exist.
  """
  out_dir = Path(out_dir)
  csv_path = out_dir / CSV_NAME
  if csv_path.exists() and not overwrite:
    raise ValueError(f"{csv_path} exists; pass overwrite=True (--overwrite) to replace it")
  if num_posters < 1 or width < 8:
    raise ValueError(f"need num_posters >= 1 and width >= 8, got {num_posters}, {width}")
  image_dir = out_dir / "posters"
  image_dir.mkdir(parents=True, exist_ok=True)
  ids = 100000 + np.cumsum(np.random.default_rng(seed).integers(1, 50, num_posters))
  tasks = [(i, int(ids[i]), seed, width, jpeg_quality, str(image_dir))
           for i in range(num_posters)]
  if num_workers > 1:
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
      rows = pool.map(_poster_row, tasks, chunksize=64)
  else:
    rows = [_poster_row(t) for t in tasks]
  tmp = csv_path.with_suffix(".csv.tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
  os.replace(tmp, csv_path)
  return csv_path


def run() -> None:
  """The poster-cnn-synthesize command."""
  import time

  from absl import app, flags, logging

  out_dir = flags.DEFINE_string("out_dir", None, "Where posters/ and MovieGenre.csv go.",
                                required=True)
  num = flags.DEFINE_integer("num_posters", 2000, "How many posters.")
  seed = flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same files.")
  width = flags.DEFINE_integer("width", 96, "Poster width in pixels (height is 1.5x).")
  workers = flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Worker processes.")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing MovieGenre.csv.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    try:
      path = generate(out_dir.value, num.value, seed=seed.value, width=width.value,
                      num_workers=workers.value, overwrite=overwrite.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    seconds = time.perf_counter() - start
    logging.info("synthesized %d posters in %.1f s (%.0f/s)", num.value, seconds,
                 num.value / seconds)
    print(path)

  app.run(main)


if __name__ == "__main__":
  run()
