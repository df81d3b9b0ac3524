"""A fixed, committed split: `poster-cnn-convert --split_file=PATH`.

The file is a CSV with the header `id,split` (the id column may carry the data set's
own name, e.g. `imdbId`) and one row per listed poster. A last row `*,NAME` sends every
row the file does not list to split NAME, so a file need only list the small splits
(configs/splits/movie_posters.csv lists validation and test and sends the rest to
train). Without a `*` row every CSV row must be listed. Ids listed but absent from the
CSV (or dropped by the converter: no genre in the vocabulary, duplicates) are ignored,
so one split file serves every vocabulary of the same posters.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from poster_cnn.data.csv_rows import ConversionError

REST = "*"


@dataclasses.dataclass(frozen=True)
class SplitFile:
  path: str
  names: tuple[str, ...]  # in order of first appearance
  assignment: dict[str, str]  # id -> split name
  rest: str | None  # the split of ids not listed, or None: every id must be listed


def read_split_file(path: str | os.PathLike) -> SplitFile:
  """Parses a split file; ConversionError naming the file and line for bad content."""
  path = os.fspath(path)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError) as e:
    raise ConversionError(f"--split_file={path}: cannot read it ({e})") from None
  if not rows or len(rows[0]) != 2 or rows[0][1].strip().lower() != "split":
    raise ConversionError(f"--split_file={path}: expected a header 'id,split'")
  names: list[str] = []
  assignment: dict[str, str] = {}
  rest = None
  for line, row in enumerate(rows[1:], 2):
    if not row:
      continue
    if len(row) != 2 or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", row[1].strip()):
      raise ConversionError(f"--split_file={path} line {line}: expected 'id,split', got {row}")
    key, name = row[0].strip(), row[1].strip()
    if rest is not None:
      raise ConversionError(f"--split_file={path} line {line}: rows after the '{REST}' row")
    if name not in names:
      names.append(name)
    if key == REST:
      rest = name
    elif key in assignment:
      raise ConversionError(f"--split_file={path} line {line}: id {key} is listed twice")
    else:
      assignment[key] = name
  if not names:
    raise ConversionError(f"--split_file={path}: lists no rows")
  return SplitFile(path, tuple(names), assignment, rest)


def plan_from_file(ids: Sequence[str], split_file: SplitFile, seed: int) -> list[np.ndarray]:
  """Row indices per split of `split_file.names`, each shuffled (the order examples are
  written in), as splits.plan_splits returns them. ConversionError when a row is not
  assigned."""
  index = {name: s for s, name in enumerate(split_file.names)}
  split = np.empty(len(ids), np.int64)
  unlisted = []
  for i, key in enumerate(ids):
    name = split_file.assignment.get(str(key), split_file.rest)
    if name is None:
      unlisted.append(str(key))
    else:
      split[i] = index[name]
  if unlisted:
    raise ConversionError(
        f"--split_file={split_file.path}: {len(unlisted)} rows of the CSV are not listed "
        f"(ids {', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}) and the file "
        f"has no '{REST},SPLIT' row for them")
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.flatnonzero(split == s)) for s in range(len(split_file.names))]
