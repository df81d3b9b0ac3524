"""CSV text -> labelled rows: the encoding, the layout, one Row per usable record,
duplicates dropped, the genre vocabulary chosen, multi-hot labels; every unusable row
recorded in a Report under its reason."""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import io
import itertools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging

# The seed paper's genres, in its order.
PAPER_GENRES = ("action", "adventure", "animation", "comedy", "crime", "drama", "fantasy",
                "horror", "mystery", "romance", "sci-fi", "short", "thriller")
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
_PATH_CHARACTERS = re.compile(r"[/\\\x00]")


class ConversionError(Exception):
  """The conversion cannot go on or produced too little. `report` (a dict, or None
  when the CSV was never read) says why. Every stage raises it; convert() callers
  catch it as `poster_cnn.data.convert.ConversionError`."""

  def __init__(self, message: str, report: dict | None = None):
    super().__init__(message)
    self.report = report


class _Skip(Exception):
  """A row that cannot be converted, with the reason recorded in the report."""

  def __init__(self, reason: str, detail: str = "", id: str = ""):
    super().__init__(reason)
    self.reason, self.detail, self.id = reason, detail, id


def normalize_genre(name: str) -> str:
  """'Sci Fi', 'sci_fi' and 'Sci-Fi' -> 'sci-fi'."""
  return re.sub(r"[\s_-]+", "-", name.strip().lower()).strip("-")


# ------------------------------------------------------------------ CSV


def read_csv_text(path: Path, encoding: str = "auto") -> tuple[str, str]:
  """The CSV's text and the encoding used.

  'auto' reads UTF-8 (a BOM allowed). A file that is not valid UTF-8 is read as
  latin-1 (the Kaggle file's encoding) only when it holds no valid multi-byte UTF-8
  character at all; one that does is UTF-8 with a few bad bytes, whose rows are
  skipped as 'undecodable_text' rather than the whole file turned to mojibake. Under
  an explicit encoding, too, undecodable bytes become lone surrogates so that only
  their rows are skipped.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise ConversionError(f"--csv={path}: file not found") from None
  except IsADirectoryError:
    raise ConversionError(f"--csv={path}: a directory, not a CSV file") from None
  except OSError as e:
    raise ConversionError(f"--csv={path}: cannot read: {e.strerror or e}") from None
  if encoding == "auto":
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    bad = len(_SURROGATE.findall(text))
    if not bad:
      return text, "utf-8"
    multibyte = len(text) - len(text.encode("ascii", "ignore")) - bad
    if multibyte >= bad:
      logging.warning("%s is UTF-8 but for %d undecodable byte(s): their rows are skipped "
                      "as undecodable_text; pass --encoding to choose", path, bad)
      return text, "utf-8"
    logging.warning("%s is not UTF-8 (%d bytes invalid, no valid multi-byte character): "
                    "reading it as latin-1; pass --encoding to choose", path, bad)
    return data.decode("latin-1"), "latin-1"
  try:
    codecs.lookup(encoding)
  except LookupError:
    raise ConversionError(f"--encoding={encoding}: unknown encoding") from None
  return data.decode(encoding, errors="surrogateescape").removeprefix("\ufeff"), encoding


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A CSV line that does not parse as one row: why, and its fields read as one line
  (for the id the report names)."""

  detail: str
  fields: list[str]


def _one_line(line: str) -> list[str]:
  try:
    return next(csv.reader([line]), [])
  except csv.Error:
    return []


def _csv_records(text: str) -> Iterator[tuple[int, int, list[str] | BadRecord]]:
  """(first line, last line, fields or BadRecord) per CSV record; lines 1-based.

  A quoted field may hold newlines (valid CSV, e.g. a two-line title), but an
  unbalanced quote would make the field run on over the rows that follow. So a record
  spanning several lines is kept only when it has the header's field count and none
  of the lines it spans parses alone as a row of that count; otherwise its first line
  is reported as malformed and parsing resumes at the next line: a stray quote costs
  its own row, never the rows after it.
  """
  lines = io.StringIO(text, newline="").readlines()
  num_fields, start = None, 0
  while start < len(lines):
    reader = csv.reader(lines[j] for j in range(start, len(lines)))
    first = start
    while True:
      error = None
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        error = f"not CSV: {e}"
      last = start + reader.line_num - 1  # 0-based index of the record's last line
      if error is None and last > first and num_fields is not None:
        if len(fields) != num_fields:
          error = (f"a quoted field runs from line {first + 1} to line {last + 1} "
                   "(unbalanced quote?)")
        elif any(len(_one_line(lines[j])) == num_fields for j in range(first + 1, last + 1)):
          over = f"line {last + 1}" if last == first + 1 else f"lines {first + 2}-{last + 1}"
          error = f"a quoted field runs on over the row(s) of {over} (unbalanced quote?)"
      if error is not None:
        yield first + 1, first + 1, BadRecord(error, _one_line(lines[first]))
        start = first + 1  # resynchronise on the next line
        break
      if num_fields is None:
        num_fields = len(fields)
      yield first + 1, last + 1, fields
      first = last + 1
    else:
      return


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
  # A title may span lines (a quoted newline); an id, genre or image name may not.
  if end > line and any("\n" in fields[columns[c]] or "\r" in fields[columns[c]]
                        for c in used[:3] if c):
    raise _Skip("malformed_row", f"a quoted newline inside the id, genre or image field "
                f"(lines {line}-{end})", row_id)
  if any(_SURROGATE.search(v) for v in values):
    raise _Skip("undecodable_text", "bytes invalid in the CSV's encoding; see --encoding",
                row_id)
  if not row_id:
    raise _Skip("malformed_row", "empty id")
  if _PATH_CHARACTERS.search(row_id):
    # An id names <image_dir>/<id>.jpg: '../x' or '/etc/x' would read outside it.
    raise _Skip("invalid_id", "an id must not contain '/', '\\' or NUL (it names "
                "<image_dir>/<id>.jpg); use --image_column for paths", row_id)
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
  title = fields[columns[layout.title_column]] if layout.title_column else ""
  title = " ".join(title.split()) if "\n" in title or "\r" in title else title.strip()
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


# ------------------------------------------------------------------ rows


def read_rows(text: str, report: Report, **layout_flags) -> tuple[Layout, list[Row]]:
  """Parses the CSV text into rows, recording unusable ones in `report`."""
  records_ = _csv_records(text)
  first = next(records_, None)
  if first is None or isinstance(first[2], BadRecord) or not any(first[2]):
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
      if isinstance(fields, BadRecord):
        i = columns[layout.id_column]
        raise _Skip("malformed_row", fields.detail,
                    fields.fields[i].strip() if len(fields.fields) > i else "")
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
