"""A fixed split from a file (poster-cnn-convert --split_file) and the committed split of
the real posters."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poster_cnn.data import convert as conv
from poster_cnn.data import records, split_file, tfrecord
from poster_cnn.data.csv_rows import ConversionError

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, rows) -> Path:
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  return path


def _kaggle(directory: Path, genres: dict[str, str]) -> Path:
  """A Kaggle-layout CSV and one 16x16 poster per id."""
  (directory / "posters").mkdir(parents=True)
  rows = [["imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster"]]
  for i, (key, g) in enumerate(genres.items()):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 9 % 256, 80, 160)).save(buf, "JPEG")
    (directory / "posters" / f"{key}.jpg").write_bytes(buf.getvalue())
    rows.append([key, f"http://www.imdb.com/title/tt{key}", "", "", g, ""])
  return _write(directory / "MovieGenre.csv", rows)


def _ids(out: Path, split: str) -> set[str]:
  meta = records.read_metadata(out)
  return {records.decode_example(r)["id"] for p in records.split_files(out, meta, split)
          for r in tfrecord.iter_records(p)}


def test_the_converter_follows_the_file_for_every_vocabulary(tmp_path):
  genres = {str(100 + i): g for i, g in enumerate(
      ["Drama", "Comedy", "Drama|Comedy", "Documentary", "Horror", "Drama", "Comedy",
       "Documentary|Drama", "Action", "Horror"])}
  csv_path = _kaggle(tmp_path / "data", genres)
  splits = _write(tmp_path / "split.csv", [["imdbId", "split"], ["101", "validation"],
                                           ["103", "test"], ["104", "test"],
                                           ["999", "test"], ["*", "train"]])
  paper = conv.convert(csv_path, tmp_path / "paper", split_file=splits, num_workers=0)
  assert paper["summary"]["splits"] == {"validation": 1, "test": 1, "train": 7}
  assert _ids(tmp_path / "paper", "test") == {"104"}  # 103 is a documentary only
  assert _ids(tmp_path / "paper", "validation") == {"101"}
  wide = conv.convert(csv_path, tmp_path / "wide", split_file=splits, num_workers=0,
                      vocabulary="min_count:1")
  assert "documentary" in wide["vocabulary"]
  assert _ids(tmp_path / "wide", "test") == {"103", "104"}
  assert _ids(tmp_path / "wide", "train") == set(genres) - {"101", "103", "104"}
  assert records.read_metadata(tmp_path / "wide").extra["conversion"]["arguments"][
      "split_file"] == str(splits)


def test_rows_the_file_does_not_place_are_an_error_before_anything_is_written(tmp_path):
  csv_path = _kaggle(tmp_path / "data", {"1": "Drama", "2": "Comedy", "3": "Horror"})
  splits = _write(tmp_path / "split.csv", [["imdbId", "split"], ["1", "train"], ["2", "test"]])
  with pytest.raises(ConversionError, match=r"split.csv: 1 rows of the CSV are not listed "
                                            r"\(ids 3\)"):
    conv.convert(csv_path, tmp_path / "out", split_file=splits, num_workers=0)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, message", [
    ([["id", "fold"], ["1", "train"]], "expected a header 'id,split'"),
    ([["id", "split"], ["1", "train"], ["1", "test"]], "line 3: id 1 is listed twice"),
    ([["id", "split"], ["1", "train", "x"]], "line 2: expected 'id,split'"),
    ([["id", "split"], ["*", "train"], ["2", "test"]], "line 3: rows after the '\\*' row"),
    ([["id", "split"]], "lists no rows"),
])
def test_a_malformed_file_names_its_line(tmp_path, rows, message):
  path = _write(tmp_path / "s.csv", rows)
  with pytest.raises(ConversionError, match=message):
    split_file.read_split_file(path)


def test_the_committed_split_of_the_real_posters():
  fixed = split_file.read_split_file(REPO / "configs" / "splits" / "movie_posters.csv")
  assert fixed.names == ("validation", "test", "train") and fixed.rest == "train"
  counts = {name: sum(v == name for v in fixed.assignment.values()) for name in fixed.names}
  # 15% each of the 13,419 posters (benchmarks/movie_posters_split.py re-creates it).
  assert counts == {"validation": 2012, "test": 2014, "train": 0}
  assert all(key.isdigit() for key in fixed.assignment)
  plan = split_file.plan_from_file(["1737", "6038506", "12"], fixed, seed=0)
  assert [p.tolist() for p in plan] == [[0], [1], [2]]
