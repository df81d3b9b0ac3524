"""CSV + poster folder -> sharded TFRecord dataset in the TFDS layout.

    poster-cnn-convert --csv=DATA/MovieGenre.csv --output_dir=DATA/posters_tfrecord
    poster-cnn-convert --csv=train.csv --image_dir=Images --vocabulary=min_count:100 \\
        --splits=train:0.8,test:0.2 --image_size=268x182 --output_dir=OUT

Layouts recognised from the header: Kaggle's `imdbId,...,Genre` (pipe-separated genres,
posters `<image_dir>/<imdbId>.jpg`) and one-hot (an id column plus one 0/1 column per
genre, e.g. `Id,Genre,Action,Adventure,...`). Other CSVs: --id_column, --genre_column
(+ --genre_separator) or --genre_columns, --image_column.

Every data row reaches the output or is listed in the report under a reason:
malformed_row, undecodable_text, empty_genres, conflicting_duplicate (CSV rows);
missing_image, unreadable_image, empty_image, corrupt_image, decompression_bomb
(images); duplicate, unlabeled (FILTERED: the user's choices, not counted towards
--max_skipped_fraction, which fails the run above that fraction of the other rows).
PNG, GIF, WebP, CMYK, greyscale, palette and 16-bit images become RGB JPEGs
(transparency composited on white); valid RGB JPEGs pass through byte for byte unless
--image_size asks for a resize.

The report goes to `<output_dir>.report.json` beside the output on every run that reads
the CSV (failed runs too, to say why) and into a published dataset as
`conversion_report.json`; metadata.json keeps its counts and the arguments.

Stages: read the CSV once (ids, genres, titles); drop duplicates; choose the vocabulary;
assign splits by iterative stratification; convert images in worker processes, in split
order, streaming into shards in a temporary directory beside the output; write metadata;
rename the directory into place.
"""

from __future__ import annotations

import collections
import codecs
import contextlib
import csv
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from poster_cnn.data import records, tfrecord

# The seed paper's genres, in its order.
PAPER_GENRES = ("action", "adventure", "animation", "comedy", "crime", "drama", "fantasy",
                "horror", "mystery", "romance", "sci-fi", "short", "thriller")
DEFAULT_SPLITS = "train:0.8,validation:0.1,test:0.1"
# 40 MP is far above any poster scan yet keeps a worker's decoded image under 120 MB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
REPORT_FILE = "conversion_report.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
IMAGE_DIR_NAMES = ("posters", "images", "Images", "SampleMoviePosters")
# Reasons that are the user's choices rather than lost data: they do not count
# towards --max_skipped_fraction.
FILTERED = frozenset({"duplicate", "unlabeled"})

_ID_KEYS = ("imdbid", "id", "movieid", "tconst")
_GENRE_KEYS = ("genre", "genres")
_TITLE_KEYS = ("title", "movietitle", "name")
# Columns that are never one-hot genres, even when their values happen to be 0/1.
_NOT_GENRE_KEYS = frozenset({
    *_ID_KEYS, *_GENRE_KEYS, *_TITLE_KEYS, "imdblink", "link", "url", "imdbscore", "score",
    "rating", "poster", "posterurl", "year", "path", "image", "imagepath", "file",
    "filename", "plot", "overview"})
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
_SAMPLE_ROWS = 200
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes the encoding could not decode
_CHUNK = 16  # images per worker task: amortises inter-process overhead


class ConversionError(Exception):
  """The conversion cannot go on or produced too little. `report` (a dict, or None
  when the CSV was never read) says why."""

  def __init__(self, message: str, report: dict | None = None):
    super().__init__(message)
    self.report = report


class _Skip(Exception):
  """A row that cannot be converted, with the reason recorded in the report."""

  def __init__(self, reason: str, detail: str = "", id: str = ""):
    super().__init__(reason)
    self.reason, self.detail, self.id = reason, detail, id


# ------------------------------------------------------------------ arguments


def normalize_genre(name: str) -> str:
  """'Sci Fi', 'sci_fi' and 'Sci-Fi' -> 'sci-fi'."""
  return re.sub(r"[\s_-]+", "-", name.strip().lower()).strip("-")


def parse_splits(spec: str | dict[str, float]) -> dict[str, float]:
  """'train:0.8,test:0.2' -> {'train': 0.8, 'test': 0.2}; fractions must sum to 1."""
  if isinstance(spec, str):
    pairs = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      name, sep, value = part.partition(":")
      try:
        pairs[name.strip()] = float(value) if sep else math.nan
      except ValueError:
        pairs[name.strip()] = math.nan
    spec = pairs
  fractions = dict(spec)
  bad = [n for n, f in fractions.items()
         if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", n) or not f > 0]
  if not fractions or bad or abs(sum(fractions.values()) - 1) > 1e-3:
    raise ConversionError(
        f"--splits={spec}: expected name:fraction pairs with positive fractions summing "
        "to 1, e.g. train:0.8,validation:0.1,test:0.1")
  total = sum(fractions.values())
  return {n: f / total for n, f in fractions.items()}


def parse_image_size(spec: str | Sequence[int] | None) -> tuple[int, int] | None:
  """'268x182' -> (268, 182) (height, width); None or 'none' -> None (keep sizes)."""
  if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
    return None
  if isinstance(spec, str):
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", spec.lower())
    size = (int(match[1]), int(match[2])) if match else (0, 0)
  else:
    size = tuple(int(v) for v in spec)
  if len(size) != 2 or min(size) < 1:
    raise ConversionError(f"--image_size={spec}: expected HEIGHTxWIDTH, e.g. 268x182, or none")
  return size


def default_num_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))  # respects container CPU limits
  except AttributeError:
    return os.cpu_count() or 1


# ------------------------------------------------------------------ CSV


def read_csv_text(path: Path, encoding: str = "auto") -> tuple[str, str]:
  """The CSV's text and the encoding used.

  'auto' tries UTF-8 (a BOM allowed) and falls back to latin-1, the Kaggle file's
  encoding. Under an explicit encoding, undecodable bytes become lone surrogates so
  that only their rows are skipped (as 'undecodable_text').
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise ConversionError(f"--csv={path}: file not found") from None
  except OSError as e:
    raise ConversionError(f"--csv={path}: cannot read: {e}") from None
  if encoding == "auto":
    try:
      return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as e:
      logging.warning("%s is not UTF-8 (byte %d): reading it as latin-1; pass --encoding "
                      "to choose", path, e.start)
      return data.decode("latin-1"), "latin-1"
  try:
    codecs.lookup(encoding)
  except LookupError:
    raise ConversionError(f"--encoding={encoding}: unknown encoding") from None
  return data.decode(encoding, errors="surrogateescape").removeprefix("\ufeff"), encoding


def _csv_records(text: str) -> Iterator[tuple[int, int, list[str] | csv.Error]]:
  """(first line, last line, fields or the csv.Error) per CSV record; lines 1-based."""
  reader = csv.reader(io.StringIO(text, newline=""))
  end = 0
  while True:
    try:
      fields = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      fields = e
    start, end = end + 1, reader.line_num
    yield start, end, fields


def _key(column: str) -> str:
  return re.sub(r"[^a-z0-9]", "", column.lower())


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which CSV columns hold what (names as in the header)."""

  kind: str  # 'kaggle', 'onehot' or 'custom'
  id_column: str
  genre_column: str | None = None  # genre names joined by genre_separator
  genre_separator: str = "|"
  genre_columns: tuple[str, ...] = ()  # one 0/1 column per genre
  image_column: str | None = None  # None: <image_dir>/<id>.jpg (or another extension)
  title_column: str | None = None


def _binary_columns(header: list[str], sample: list[list[str]], exclude: set) -> list[str]:
  """Columns whose sampled values are (almost all) 0/1: one-hot genre candidates."""
  rows = [r for r in sample if len(r) == len(header)]
  columns = []
  for i, name in enumerate(header):
    if not rows or name in exclude or _key(name) in _NOT_GENRE_KEYS:
      continue
    # Not all: a malformed value must fail its row, not hide its column.
    bad = sum(r[i].strip() not in _BINARY for r in rows)
    if bad <= max(1, 0.05 * len(rows)) and bad < len(rows) / 2:
      columns.append(name)
  return columns


def detect_layout(header: list[str], sample: list[list[str]], *, layout: str = "auto",
                  id_column: str | None = None, image_column: str | None = None,
                  title_column: str | None = None, genre_column: str | None = None,
                  genre_columns: Sequence[str] | None = None,
                  genre_separator: str = "|") -> Layout:
  """The layout from the header, a sample of rows and the column flags.

  Flags naming columns win; otherwise Kaggle (`imdbId` + `Genre`) or one-hot (an id
  column plus 0/1 columns) is recognised. Ambiguous or unrecognised headers raise a
  ConversionError naming the flags that resolve them.
  """
  for flag, column in [("--id_column", id_column), ("--image_column", image_column),
                       ("--title_column", title_column), ("--genre_column", genre_column),
                       *(("--genre_columns", c) for c in genre_columns or ())]:
    if column is not None and column not in header:
      raise ConversionError(f"{flag}={column}: no such column; the CSV header is {header}")
  if genre_column and genre_columns:
    raise ConversionError("pass --genre_column (separated names) or --genre_columns "
                          "(0/1 columns), not both")
  by_key = {}
  for name in header:
    by_key.setdefault(_key(name), name)
  id_col = id_column or next((by_key[k] for k in _ID_KEYS if k in by_key), None)
  if id_col is None:
    raise ConversionError(f"no id column in the CSV header {header}: pass --id_column")
  common = dict(id_column=id_col, image_column=image_column, genre_separator=genre_separator,
                title_column=title_column or next(
                    (by_key[k] for k in _TITLE_KEYS if k in by_key), None))
  if genre_column:
    return Layout("custom", genre_column=genre_column, **common)
  if genre_columns:
    return Layout("custom", genre_columns=tuple(genre_columns), **common)

  genre_col = next((by_key[k] for k in _GENRE_KEYS if k in by_key), None)
  onehot = _binary_columns(header, sample, {id_col, image_column, common["title_column"]})
  if layout == "auto":
    kaggle = genre_col is not None and _key(id_col) == "imdbid"
    if kaggle and len(onehot) >= 2:
      raise ConversionError(
          f"ambiguous CSV layout: {genre_col!r} holds genre names and columns {onehot} "
          "hold 0/1: pass --layout=kaggle or --layout=onehot")
    if kaggle:
      layout = "kaggle"
    elif len(onehot) >= 2:
      layout = "onehot"
    else:
      raise ConversionError(
          f"unrecognised CSV layout (header {header}); expected Kaggle's imdbId,...,Genre "
          "or an id column plus 0/1 genre columns. Pass --genre_column (and "
          "--genre_separator) or --genre_columns, plus --id_column and --image_column "
          "if needed")
  if layout == "kaggle":
    if genre_col is None:
      raise ConversionError(f"--layout=kaggle: no Genre column in {header}; pass --genre_column")
    return Layout("kaggle", genre_column=genre_col, **common)
  if layout == "onehot":
    if not onehot:
      raise ConversionError(f"--layout=onehot: no 0/1 columns in {header}; pass --genre_columns")
    return Layout("onehot", genre_columns=tuple(onehot), **common)
  raise ConversionError(f"--layout={layout}: expected auto, kaggle or onehot")


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
  """One usable CSV row; everything the conversion keeps in memory per poster."""

  line: int  # the CSV line where the row starts (the header is line 1)
  id: str
  genres: tuple[str, ...]  # normalised, sorted, unique
  title: str = ""
  image: str | None = None  # the image column's value; None: found by id


def _split_genres(value: str, separator: str) -> set[str]:
  # Strip brackets and quotes too, so "['Drama', 'Romance']" with ',' also parses.
  names = (normalize_genre(v.strip().strip("[]'\"")) for v in value.split(separator))
  return {n for n in names if n}


def parse_row(fields: list[str], line: int, end: int, num_fields: int,
              columns: dict[str, int], layout: Layout) -> Row:
  """One CSV record (lines `line`..`end`) -> Row, or raises _Skip with the reason."""
  id_index = columns[layout.id_column]
  row_id = fields[id_index].strip() if len(fields) > id_index else ""
  if len(fields) != num_fields:
    raise _Skip("malformed_row", f"{len(fields)} fields, the header has {num_fields}",
                row_id)
  used = [layout.id_column, layout.genre_column, layout.image_column, layout.title_column]
  values = [fields[columns[c]] for c in used if c]
  if end > line and any("\n" in v or "\r" in v for v in values):
    raise _Skip("malformed_row", f"a quoted field spans lines {line}-{end} "
                "(unbalanced quote?)", row_id)
  if any(_SURROGATE.search(v) for v in values):
    raise _Skip("undecodable_text", "bytes invalid in the CSV's encoding; see --encoding",
                row_id)
  if not row_id:
    raise _Skip("malformed_row", "empty id")
  if layout.genre_column:
    genres = _split_genres(fields[columns[layout.genre_column]], layout.genre_separator)
  else:
    genres = set()
    for name in layout.genre_columns:
      value = fields[columns[name]].strip()
      if value not in _BINARY:
        raise _Skip("malformed_row", f"column {name!r}: {value!r} is not 0 or 1", row_id)
      if _BINARY[value]:
        genres.add(normalize_genre(name))
  if not genres:
    raise _Skip("empty_genres", "", row_id)
  image = None
  if layout.image_column:
    image = fields[columns[layout.image_column]].strip()
    if not image:
      raise _Skip("malformed_row", f"empty {layout.image_column!r}", row_id)
  title = fields[columns[layout.title_column]].strip() if layout.title_column else ""
  return Row(line, row_id, tuple(sorted(genres)), title, image)


# ------------------------------------------------------------------ report


def _printable(text: str) -> str:
  """Undecodable bytes (lone surrogates) as \\udcXX escapes, which JSON can hold."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Report:
  """Every row that does not reach the output, by reason, plus counts."""

  def __init__(self):
    self.rows = 0  # data rows read (blank lines excepted)
    self.reasons: dict[str, list[dict]] = collections.defaultdict(list)

  def skip(self, reason: str, id: str, line: int, detail: str = "") -> None:
    entry = {"id": _printable(id), "line": line}
    if detail:
      entry["detail"] = _printable(detail)
    self.reasons[reason].append(entry)

  def count(self, filtered: bool) -> int:
    return sum(len(v) for r, v in self.reasons.items() if (r in FILTERED) == filtered)

  def summary(self, splits: dict[str, int]) -> dict:
    """Counts only: what metadata.json keeps."""
    skipped, filtered = self.count(False), self.count(True)
    return {
        "rows": self.rows, "converted": sum(splits.values()), "skipped": skipped,
        "filtered": filtered,
        "skipped_fraction": skipped / max(self.rows - filtered, 1),
        "splits": dict(splits),
        "reasons": {r: len(v) for r, v in sorted(self.reasons.items())},
    }

  def listing(self) -> dict:
    return {r: {"filtered": r in FILTERED, "count": len(v),
                "rows": sorted(v, key=lambda e: e["line"])}
            for r, v in sorted(self.reasons.items())}


def format_summary(report: dict) -> str:
  """The console table for a report dict (as convert() returns or writes it)."""
  s = report["summary"]
  lines = [
      f"conversion {report['status']}: {report['csv']} -> {report['output_dir']}",
      f"  {'rows read':<24}{s['rows']:>8}",
      f"  {'converted':<24}{s['converted']:>8}   "
      + " / ".join(f"{k} {v}" for k, v in s["splits"].items()),
      f"  {'skipped':<24}{s['skipped']:>8}   ({s['skipped_fraction']:.2%} of the "
      f"{s['rows'] - s['filtered']} rows not filtered; limit "
      f"{report['arguments']['max_skipped_fraction']:.0%})",
      f"  {'filtered':<24}{s['filtered']:>8}   (duplicates, no genre in the vocabulary)",
  ]
  if report["reasons"]:
    lines.append(f"  {'reason':<24}{'count':>8}   first rows (id@line)")
  for reason, entry in report["reasons"].items():
    first = ", ".join(f"{e['id']}@{e['line']}" for e in entry["rows"][:4])
    more = " ..." if entry["count"] > 4 else ""
    lines.append(f"  {reason:<24}{entry['count']:>8}   {first}{more}")
  if report.get("error"):
    lines.append(f"  error: {report['error']}")
  lines.append(f"  report: {report['report_path']}")
  return "\n".join(lines)


# ------------------------------------------------------------------ rows


def read_rows(text: str, report: Report, **layout_flags) -> tuple[Layout, list[Row]]:
  """Parses the CSV text into rows, recording unusable ones in `report`."""
  records_ = _csv_records(text)
  first = next(records_, None)
  if first is None or isinstance(first[2], csv.Error) or not any(first[2]):
    raise ConversionError("the CSV is empty or its header is unreadable")
  header = [h.strip() for h in first[2]]
  head = list(itertools.islice(records_, _SAMPLE_ROWS))
  layout = detect_layout(header, [f for _, _, f in head if isinstance(f, list)], **layout_flags)
  columns = {}
  for i, name in enumerate(header):
    columns.setdefault(name, i)  # of repeated names, the first wins
  rows = []
  for line, end, fields in itertools.chain(head, records_):
    if isinstance(fields, list) and not any(f.strip() for f in fields):
      continue  # blank line, or only commas
    report.rows += 1
    try:
      if isinstance(fields, csv.Error):
        raise _Skip("malformed_row", str(fields))
      rows.append(parse_row(fields, line, end, len(header), columns, layout))
    except _Skip as s:
      report.skip(s.reason, s.id, line, s.detail)
  return layout, rows


def drop_duplicates(rows: list[Row], report: Report) -> list[Row]:
  """Keeps the first of rows sharing an id and genres; drops every copy of an id whose
  rows disagree (which of them is right cannot be known)."""
  copies = collections.defaultdict(list)
  for row in rows:
    copies[row.id].append(row)
  kept = []
  for row in rows:
    same = copies[row.id]
    if len(same) == 1 or (row is same[0] and all(r.genres == row.genres for r in same)):
      kept.append(row)
    elif any(r.genres != same[0].genres for r in same):
      report.skip("conflicting_duplicate", row.id, row.line,
                  "rows at lines " + ", ".join(str(r.line) for r in same)
                  + " give different genres")
    else:
      report.skip("duplicate", row.id, row.line, f"same genres as line {same[0].line}")
  return kept


def choose_vocabulary(spec: str | Sequence[str], rows: Sequence[Row]) -> tuple[str, ...]:
  """'paper', 'min_count:N' (genres with >= N rows, by frequency then name) or a list."""
  if isinstance(spec, str):
    spec = spec.strip()
    if spec == "paper":
      return PAPER_GENRES
    if spec.startswith("min_count:"):
      try:
        n = int(spec.partition(":")[2])
      except ValueError:
        raise ConversionError(f"--vocabulary={spec}: expected min_count:N, N an integer") from None
      counts = collections.Counter(g for r in rows for g in r.genres)
      vocabulary = tuple(sorted((g for g, c in counts.items() if c >= n),
                                key=lambda g: (-counts[g], g)))
      if not vocabulary:
        top = counts.most_common(1)
        raise ConversionError(f"--vocabulary={spec}: no genre has {n} rows (the most "
                              f"frequent: {top[0] if top else 'none'})")
      return vocabulary
    spec = spec.split(",")
  vocabulary = tuple(dict.fromkeys(filter(None, map(normalize_genre, spec))))
  if not vocabulary:
    raise ConversionError("--vocabulary: no genre names given")
  return vocabulary


def label_rows(rows: list[Row], vocabulary: Sequence[str], unlabeled: str,
               report: Report) -> tuple[list[Row], np.ndarray]:
  """Rows kept and their multi-hot labels, uint8 (num_rows, num_genres).

  Rows with no genre in the vocabulary are dropped ('unlabeled') or kept with all-zero
  labels, as `unlabeled` says.
  """
  index = {g: i for i, g in enumerate(vocabulary)}
  kept, labels = [], []
  for row in rows:
    hot = np.zeros(len(vocabulary), np.uint8)
    hot[[index[g] for g in row.genres if g in index]] = 1
    if not hot.any() and unlabeled == "drop":
      report.skip("unlabeled", row.id, row.line,
                  "genres " + "|".join(row.genres) + " are not in the vocabulary")
      continue
    kept.append(row)
    labels.append(hot)
  return kept, np.asarray(labels, np.uint8).reshape(len(kept), len(vocabulary))


# ------------------------------------------------------------------ splits


def stratified_split(labels: np.ndarray, fractions: Sequence[float],
                     rng: np.random.Generator) -> np.ndarray:
  """Iterative stratification for multi-label data (Sechidis et al., 2011).

  Takes the genre with fewest unassigned examples, and gives each of its examples to
  the split that most lacks that genre (ties: the split most lacking examples, then
  random). Rare genres go first so they spread over the splits before common genres
  fill them.

  Args:
    labels: (n, k) multi-hot.
    fractions: (s,) split fractions summing to 1.
  Returns:
    int64 (n,) split index per example.
  """
  labels = np.asarray(labels, bool)
  n, k = labels.shape
  fractions = np.asarray(fractions, np.float64)
  want = fractions * n  # examples each split still lacks
  want_label = np.outer(fractions, labels.sum(0))  # (s, k) positives it still lacks
  remaining = labels.sum(0)
  split = np.full(n, -1, np.int64)
  order = rng.permutation(n)
  members = [order[labels[order, j]] for j in range(k)]

  def best(scores: np.ndarray) -> int:
    candidates = np.flatnonzero(scores == scores.max())
    if len(candidates) > 1:
      candidates = candidates[want[candidates] == want[candidates].max()]
    return int(candidates[0] if len(candidates) == 1 else rng.choice(candidates))

  while (remaining > 0).any():
    j = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(remaining.dtype).max)))
    for i in members[j]:
      if split[i] >= 0:
        continue
      s = best(want_label[:, j])
      split[i] = s
      want[s] -= 1
      want_label[s, labels[i]] -= 1
      remaining[labels[i]] -= 1
  for i in order[split[order] < 0]:  # examples without labels (--unlabeled=keep)
    s = best(want)
    split[i] = s
    want[s] -= 1
  return split


def plan_splits(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
  """Row indices per split, each shuffled (the order examples are written in)."""
  rng = np.random.default_rng(seed)
  split = stratified_split(labels, fractions, rng)
  return [rng.permutation(np.flatnonzero(split == s)) for s in range(len(fractions))]


# ------------------------------------------------------------------ images


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  size: tuple[int, int] | None  # (height, width); None keeps each poster's size
  quality: int
  max_pixels: int


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
  """PIL refuses images over `max_pixels` (its warning made an error too)."""
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = max_pixels
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      yield
  finally:
    Image.MAX_IMAGE_PIXELS = old


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB; transparency composited on white."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit greyscale
    pixels = np.asarray(img, np.float64)
    if pixels.max(initial=0) > 255:
      pixels = pixels / 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
  return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_jpeg(data: bytes, opts: ImageOptions) -> bytes:
  """Validated RGB JPEG bytes: `data` itself when it already is one and no resize is
  asked, else decoded, converted and re-encoded."""
  with _pixel_limit(opts.max_pixels):
    img = Image.open(io.BytesIO(data))  # checks the pixel count in the header
    if opts.size and img.format == "JPEG":
      h, w = opts.size
      img.draft(None, (2 * w, 2 * h))  # DCT-domain downscale, kept >= 2x the target
    img.load()  # a full decode: truncation and corruption surface here
  # EXIF orientation is left alone, as TensorFlow's and the pipeline's decoders do.
  if img.format == "JPEG" and img.mode == "RGB" and opts.size in (None, img.size[::-1]):
    return data
  img = _to_rgb(img)
  if opts.size and img.size != opts.size[::-1]:
    # BICUBIC in PIL widens its kernel when shrinking, so it averages like area resampling.
    img = img.resize(opts.size[::-1], Image.BICUBIC)
  out = io.BytesIO()
  img.save(out, "JPEG", quality=opts.quality)
  return out.getvalue()


def convert_image(candidates: Sequence[str], opts: ImageOptions) -> tuple[bytes | None, str, str]:
  """The first existing path of `candidates` -> (jpeg, '', '') or (None, reason, detail).

  Never raises on bad input: whatever an image does, its row is skipped, not the run.
  """
  path = next((p for p in candidates if os.path.exists(p)), None)
  if path is None:
    others = ", ".join(Path(p).suffix for p in candidates[1:])
    return None, "missing_image", f"{candidates[0]} not found" + (
        f" (nor with {others})" if others else "")
  try:
    data = Path(path).read_bytes()
  except OSError as e:
    return None, "unreadable_image", f"{path}: {e.strerror or e}"
  if not data:
    return None, "empty_image", f"{path} is empty (0 bytes)"
  try:
    return _to_jpeg(data, opts), "", ""
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    return None, "decompression_bomb", f"{path}: {e}"
  except UnidentifiedImageError:
    return None, "corrupt_image", f"{path}: not an image format PIL can read"
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
    return None, "corrupt_image", f"{path}: {type(e).__name__}: {e}"


def _convert_chunk(opts: ImageOptions, chunk: list[Sequence[str]]) -> list[tuple]:
  return [convert_image(c, opts) for c in chunk]


def _ignore_sigint() -> None:
  # Ctrl-C reaches the whole process group; the parent alone handles it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def converted_images(tasks: Iterable[Sequence[str]], num_tasks: int, opts: ImageOptions,
                     num_workers: int) -> Iterator[tuple[bytes | None, str, str]]:
  """convert_image over `tasks` (lists of candidate paths), results in task order.

  With workers, at most 2 chunks per worker are in flight and tasks are drawn as
  needed, so memory stays bounded however many posters and however fast workers run
  ahead of the writer. `spawn` rather than fork: the calling process may hold threads
  (JAX, grain) that fork would copy mid-lock.
  """
  if num_workers == 0:
    yield from (convert_image(t, opts) for t in tasks)
    return
  tasks = iter(tasks)
  chunks = iter(lambda: list(itertools.islice(tasks, _CHUNK)), [])
  num_workers = max(1, min(num_workers, math.ceil(num_tasks / _CHUNK)))
  pool = futures.ProcessPoolExecutor(num_workers, multiprocessing.get_context("spawn"),
                                     initializer=_ignore_sigint)

  def results(chunk, future):
    try:
      return future.result()
    except BrokenProcessPool:
      raise ConversionError(f"a worker process died converting {chunk[0][0]} ... "
                            f"{chunk[-1][0]}; rerun with --num_workers=0 to find the "
                            "image") from None

  try:
    pending = collections.deque()
    for chunk in chunks:
      pending.append((chunk, pool.submit(_convert_chunk, opts, chunk)))
      if len(pending) > 2 * num_workers:
        yield from results(*pending.popleft())
    while pending:
      yield from results(*pending.popleft())
    pool.shutdown(wait=True)
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def _candidates(row: Row, image_dir: Path) -> tuple[str, ...]:
  """Paths to try for a row's image, in order."""
  if row.image is not None:
    path = Path(row.image)
    return (str(path if path.is_absolute() else image_dir / path),)
  return tuple(str(image_dir / f"{row.id}{ext}") for ext in IMAGE_EXTENSIONS)


# ------------------------------------------------------------------ writing


class _SplitWriter:
  """Streams a split's examples into shards of `examples_per_shard`, named with the
  shard count once it is known."""

  def __init__(self, directory: Path, split: str, examples_per_shard: int, num_genres: int):
    self.directory, self.split, self.per_shard = directory, split, examples_per_shard
    self.shard_lengths: list[int] = []
    self.num_bytes = 0
    self.positives = np.zeros(num_genres, np.int64)
    self._writer: tfrecord.TFRecordWriter | None = None

  def _partial(self, shard: int) -> Path:
    return self.directory / f"{self.split}.partial-{shard:05d}"

  def _close_shard(self) -> None:
    self._writer.close()
    self.shard_lengths.append(self._writer.num_records)
    self.num_bytes += self._writer.num_bytes
    self._writer = None

  def write(self, record: bytes, labels: np.ndarray) -> None:
    if self._writer is not None and self._writer.num_records == self.per_shard:
      self._close_shard()
    if self._writer is None:
      self._writer = tfrecord.TFRecordWriter(self._partial(len(self.shard_lengths)))
    self._writer.write(record)
    self.positives += labels

  def abort(self) -> None:
    """Closes the open shard; the caller discards the directory."""
    if self._writer is not None:
      self._writer.close()

  def finish(self) -> records.SplitInfo:
    if self._writer is None and not self.shard_lengths:
      self._writer = tfrecord.TFRecordWriter(self._partial(0))  # an empty split: one empty shard
    if self._writer is not None:
      self._close_shard()
    n = len(self.shard_lengths)
    for i in range(n):
      os.rename(self._partial(i), self.directory / records.shard_filename(self.split, i, n))
    return records.SplitInfo(self.split, sum(self.shard_lengths), tuple(self.shard_lengths),
                             self.num_bytes, tuple(int(p) for p in self.positives))


class _Progress:
  """Logs images done, rate and ETA every `every` seconds."""

  def __init__(self, total: int, every: float = 5.0):
    self.total, self.every = total, every
    self.start = self.last = time.monotonic()

  def update(self, done: int, skipped: int) -> None:
    now = time.monotonic()
    if now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate else math.inf
    logging.info("images %d/%d (%.1f%%), %.0f/s, ETA %.0fs, skipped %d", done, self.total,
                 100 * done / max(self.total, 1), rate, eta, skipped)


def write_splits(directory: Path, rows: list[Row], labels: np.ndarray,
                 plan: list[np.ndarray], split_names: Sequence[str],
                 vocabulary: Sequence[str], image_dir: Path, opts: ImageOptions,
                 num_workers: int, examples_per_shard: int,
                 report: Report) -> dict[str, records.SplitInfo]:
  """Converts every planned row's image and writes the shards of every split."""
  order = np.concatenate(plan) if plan else np.zeros(0, np.int64)
  split_of = np.concatenate([np.full(len(p), s) for s, p in enumerate(plan)])
  writers = [_SplitWriter(directory, name, examples_per_shard, len(vocabulary))
             for name in split_names]
  tasks = (_candidates(rows[i], image_dir) for i in order)
  progress = _Progress(len(order))
  with contextlib.closing(converted_images(tasks, len(order), opts, num_workers)) as results:
    try:
      for done, (i, s, (image, reason, detail)) in enumerate(zip(order, split_of, results), 1):
        row = rows[i]
        if image is None:
          report.skip(reason, row.id, row.line, detail)
        else:
          writers[s].write(records.encode_example(image=image, id=row.id, title=row.title,
                                                  labels=labels[i], vocabulary=vocabulary),
                           labels[i])
        progress.update(done, report.count(False))
    except BaseException:
      for w in writers:
        w.abort()
      raise
  return {w.split: w.finish() for w in writers}


def _check_output(output_dir: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
  """Refuses to replace an existing output without --overwrite, or one holding inputs."""
  if not output_dir.exists():
    return
  if output_dir.is_dir() and not any(output_dir.iterdir()):
    return  # an empty directory holds nothing to lose
  if not overwrite:
    raise ConversionError(f"--output_dir={output_dir} exists: pass --overwrite to replace it "
                          "(it is replaced only once the new dataset is complete)")
  for path in inputs:
    if path.resolve().is_relative_to(output_dir.resolve()):
      raise ConversionError(f"--output_dir={output_dir} contains the input {path}: "
                            "--overwrite would delete it; choose another --output_dir")


def _sibling(path: Path, kind: str) -> Path:
  """A new directory beside `path`, with the permissions the umask gives (mkdtemp's
  0700 would end up on the published dataset)."""
  while True:
    candidate = path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
      candidate.mkdir()
      return candidate
    except FileExistsError:
      continue


@contextlib.contextmanager
def _staging(output_dir: Path) -> Iterator[Path]:
  """A temporary directory beside `output_dir` (same file system), renamed to it when
  the block completes, removed when it raises (KeyboardInterrupt included). An old
  output is replaced only after the new one is complete."""
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(output_dir, "tmp")
  try:
    yield tmp
    if not output_dir.exists():
      os.rename(tmp, output_dir)
      return
    old = _sibling(output_dir, "old")
    os.rename(output_dir, old / output_dir.name)
    try:
      os.rename(tmp, output_dir)
    except BaseException:
      os.rename(old / output_dir.name, output_dir)
      raise
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed


def _write_report(path: Path, report: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
  os.replace(tmp, path)


def _jsonable(value):
  """`value` as JSON reads it back: tuples as lists, paths as strings."""
  return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------ convert


def _check_arguments(*, unlabeled, jpeg_quality, examples_per_shard, num_workers,
                     max_skipped_fraction, max_image_pixels) -> None:
  """Fails on a bad argument before anything is read or written."""
  if unlabeled not in ("drop", "keep"):
    raise ConversionError(f"--unlabeled={unlabeled}: expected drop or keep")
  for flag, value, low, high in [("jpeg_quality", jpeg_quality, 1, 100),
                                 ("examples_per_shard", examples_per_shard, 1, math.inf),
                                 ("num_workers", num_workers, 0, math.inf),
                                 ("max_skipped_fraction", max_skipped_fraction, 0, 1),
                                 ("max_image_pixels", max_image_pixels, 1, math.inf)]:
    if not low <= value <= high:
      raise ConversionError(f"--{flag}={value}: expected a value in [{low}, {high}]")


def _plan_rows(text: str, report: Report, result: dict, layout_flags: dict,
               vocabulary, unlabeled: str, fractions: dict[str, float], seed: int,
               image_dir: Path) -> tuple[list[Row], np.ndarray, tuple[str, ...], list]:
  """CSV text -> (rows, uint8 labels (n, k), vocabulary, row indices per split);
  fills `result`'s layout and vocabulary as soon as they are known."""
  layout, rows = read_rows(text, report, **layout_flags)
  result["layout"] = _jsonable(dataclasses.asdict(layout))
  rows = drop_duplicates(rows, report)
  vocab = choose_vocabulary(vocabulary, rows)
  result["vocabulary"] = list(vocab)
  rows, labels = label_rows(rows, vocab, unlabeled, report)
  if not rows:
    raise ConversionError(f"no usable row in the CSV; see {result['report_path']}")
  if not image_dir.is_dir() and any(r.image is None or not Path(r.image).is_absolute()
                                    for r in rows):
    raise ConversionError(f"--image_dir={image_dir}: not a directory")
  result["genres_without_rows"] = [g for g, n in zip(vocab, labels.sum(0)) if n == 0]
  if result["genres_without_rows"]:
    logging.warning("vocabulary genres without any row: %s", result["genres_without_rows"])
  logging.info("%d usable rows (%s layout), %d genres", len(rows), layout.kind, len(vocab))
  return rows, labels, vocab, plan_splits(labels, list(fractions.values()), seed)


def _check_converted(summary: dict, max_skipped_fraction: float, report_path: Path) -> None:
  if summary["converted"] == 0:
    raise ConversionError(f"no row could be converted; see {report_path}")
  if summary["skipped_fraction"] > max_skipped_fraction:
    top = ", ".join(f"{r} {n}" for r, n in summary["reasons"].items() if r not in FILTERED)
    raise ConversionError(
        f"{summary['skipped']} of {summary['rows'] - summary['filtered']} rows "
        f"({summary['skipped_fraction']:.1%}) were skipped ({top}), more than "
        f"--max_skipped_fraction={max_skipped_fraction}; see {report_path} for the rows, "
        "then fix the input or raise --max_skipped_fraction")


def convert(csv_path: str | os.PathLike, output_dir: str | os.PathLike, *,
            image_dir: str | os.PathLike | None = None, layout: str = "auto",
            id_column: str | None = None, image_column: str | None = None,
            title_column: str | None = None, genre_column: str | None = None,
            genre_columns: Sequence[str] | None = None, genre_separator: str = "|",
            encoding: str = "auto", vocabulary: str | Sequence[str] = "paper",
            unlabeled: str = "drop", splits: str | dict[str, float] = DEFAULT_SPLITS,
            seed: int = 0, image_size: str | Sequence[int] | None = None,
            jpeg_quality: int = 95, examples_per_shard: int = 1000,
            num_workers: int | None = None, max_skipped_fraction: float = 0.05,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
            overwrite: bool = False) -> dict:
  """Converts a CSV of posters and genres into a TFRecord dataset at `output_dir`.

  Arguments mirror the poster-cnn-convert flags (see `_define_flags`). `image_dir`
  defaults to a posters/ (or images/, Images/, SampleMoviePosters/) folder beside the
  CSV, else the CSV's folder. `num_workers=0` converts images in this process.

  Returns:
    the report (a JSON-able dict), also written to `<output_dir>.report.json` and
    `<output_dir>/conversion_report.json`.
  Raises:
    ConversionError: bad arguments or input, no usable row, or too many skipped. Nothing
      is published; `.report` holds the report when the CSV was read (also written to
      `<output_dir>.report.json`).
  """
  arguments = _jsonable(locals())
  layout_flags = dict(layout=layout, id_column=id_column, image_column=image_column,
                      title_column=title_column, genre_column=genre_column,
                      genre_columns=genre_columns, genre_separator=genre_separator)
  fractions, size = parse_splits(splits), parse_image_size(image_size)
  num_workers = default_num_workers() if num_workers is None else num_workers
  _check_arguments(unlabeled=unlabeled, jpeg_quality=jpeg_quality, num_workers=num_workers,
                   examples_per_shard=examples_per_shard, max_image_pixels=max_image_pixels,
                   max_skipped_fraction=max_skipped_fraction)
  csv_path, output_dir = Path(csv_path), Path(output_dir)
  image_dir = Path(image_dir) if image_dir else next(
      (p for p in (csv_path.parent / n for n in IMAGE_DIR_NAMES) if p.is_dir()), csv_path.parent)
  _check_output(output_dir, overwrite, [csv_path, image_dir])
  text, used_encoding = read_csv_text(csv_path, encoding)

  start, report = time.monotonic(), Report()
  report_path = Path(f"{output_dir}.report.json")
  result = {"status": "failed", "error": None, "csv": str(csv_path),
            "image_dir": str(image_dir), "output_dir": str(output_dir),
            "report_path": str(report_path), "encoding": used_encoding, "layout": None,
            "vocabulary": None, "arguments": arguments}
  split_sizes = {name: 0 for name in fractions}
  try:
    rows, labels, vocab, plan = _plan_rows(text, report, result, layout_flags, vocabulary,
                                           unlabeled, fractions, seed, image_dir)
    del text
    logging.info("converting %d posters from %s with %d workers", len(rows), csv_path,
                 num_workers)
    with _staging(output_dir) as tmp:
      infos = write_splits(tmp, rows, labels, plan, list(fractions), vocab, image_dir,
                           ImageOptions(size, jpeg_quality, max_image_pixels), num_workers,
                           examples_per_shard, report)
      split_sizes = {name: info.num_examples for name, info in infos.items()}
      summary = report.summary(split_sizes)
      _check_converted(summary, max_skipped_fraction, report_path)
      summary["seconds"] = round(time.monotonic() - start, 3)
      result.update(status="ok", summary=summary, reasons=report.listing())
      records.write_metadata(tmp, records.DatasetMetadata(
          vocabulary=vocab, splits=infos, image_size=size,
          extra={"conversion": {"source_csv": str(csv_path.resolve()),
                                "image_dir": str(image_dir.resolve()),
                                "encoding": used_encoding, "layout": result["layout"],
                                "arguments": arguments, "report": summary}}),
          description=f"Movie posters with multi-hot genre labels, converted from {csv_path}.")
      _write_report(tmp / REPORT_FILE, result)
  except BaseException as e:  # the report must say why, whatever stopped the run
    result.update(status="failed", error=str(e) or type(e).__name__,
                  summary=report.summary(split_sizes), reasons=report.listing())
    result["summary"]["seconds"] = round(time.monotonic() - start, 3)
    _write_report(report_path, result)
    if isinstance(e, ConversionError):
      e.report = result
    raise
  _write_report(report_path, result)
  logging.info("wrote %s: %s", output_dir, split_sizes)
  return result


# ------------------------------------------------------------------ command line


def _define_flags() -> dict:
  """Defines the flags (only when run() runs, so importing this module from another absl
  program or a test registers none); returns {convert() argument: FlagHolder}."""
  from absl import flags
  text, number, bool_ = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_bool
  return dict(
      csv_path=text("csv", None, "The CSV of posters and genres.", required=True),
      output_dir=text("output_dir", None, "Where to write the dataset.", required=True),
      image_dir=text("image_dir", None, "Folder of posters; default: posters/ (or images/, "
                     "Images/, SampleMoviePosters/) beside the CSV, else the CSV's folder."),
      layout=flags.DEFINE_enum("layout", "auto", ["auto", "kaggle", "onehot"], "CSV layout."),
      id_column=text("id_column", None, "Column of poster ids."),
      image_column=text("image_column", None, "Column of image paths, relative to "
                        "--image_dir or absolute; default: <image_dir>/<id>.jpg (.png, ...)."),
      title_column=text("title_column", None, "Column of titles (optional)."),
      genre_column=text("genre_column", None, "Column of genre names, --genre_separator "
                        "between them."),
      genre_columns=flags.DEFINE_list("genre_columns", None, "0/1 columns, one per genre."),
      genre_separator=text("genre_separator", "|", "Separator in --genre_column."),
      encoding=text("encoding", "auto", "CSV encoding; auto: UTF-8, else latin-1."),
      vocabulary=text("vocabulary", "paper", "'paper' (the seed paper's 13 genres), "
                      "'min_count:N' (genres with >= N usable rows) or a comma list."),
      unlabeled=flags.DEFINE_enum("unlabeled", "drop", ["drop", "keep"],
                                  "Rows with no genre in the vocabulary."),
      splits=text("splits", DEFAULT_SPLITS, "name:fraction,... (train:0.8,test:0.2: the paper)."),
      seed=number("seed", 0, "Seed of the split assignment and order."),
      image_size=text("image_size", "none", "HEIGHTxWIDTH to resize to, or none."),
      jpeg_quality=number("jpeg_quality", 95, "Quality of re-encoded JPEGs."),
      examples_per_shard=number("examples_per_shard", 1000, "Examples per shard."),
      num_workers=number("num_workers", None, "Image worker processes; default: the CPUs "
                         "available; 0: convert in this process."),
      max_skipped_fraction=flags.DEFINE_float(
          "max_skipped_fraction", 0.05, "Fail when more of the rows not filtered (duplicates, "
          "no genre in the vocabulary) are skipped."),
      max_image_pixels=number("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
                              "Larger images are skipped as decompression bombs."),
      overwrite=bool_("overwrite", False, "Replace an existing --output_dir, once the new "
                      "dataset is complete."),
  )


def run() -> None:
  """The poster-cnn-convert console script: exit status 1 when the conversion fails."""
  from absl import app
  holders = _define_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
      report = convert(**{name: holder.value for name, holder in holders.items()})
    except ConversionError as e:
      if e.report is not None:
        print(format_summary(e.report))
      print(f"poster-cnn-convert: error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      print("poster-cnn-convert: interrupted; no dataset written", file=sys.stderr)
      return 130
    print(format_summary(report))
    return 0

  app.run(main)


if __name__ == "__main__":
  run()
