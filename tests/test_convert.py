"""The CSV + posters -> TFRecord converter: layouts, bad input, splits, atomic output.

Datasets here are tens of 32x32 posters written by the tests themselves, converted
in-process (num_workers=0) except where worker processes are the point.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from poster_cnn.data import convert as conv
from poster_cnn.data import csv_rows, records, tfrecord
from poster_cnn.data import splits as splits_lib

REPO = Path(__file__).resolve().parents[1]
KAGGLE_HEADER = ["imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster"]
GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]
VOCAB = "action,comedy,drama,horror,sci-fi"


# ------------------------------------------------------------------ helpers


def image_bytes(colour=(200, 40, 40), size=(32, 32), mode="RGB", fmt="JPEG", **save) -> bytes:
  """An encoded image of one colour; size is (width, height) as in PIL."""
  img = Image.new("RGB", size, colour[:3])
  if mode != "RGB":
    img = img.convert(mode)
  out = io.BytesIO()
  img.save(out, fmt, **save)
  return out.getvalue()


def noisy_jpeg(size=(64, 64), seed=0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", quality=90)
  return out.getvalue()


def write_csv(path: Path, header, rows, encoding="utf-8") -> Path:
  with open(path, "w", newline="", encoding=encoding) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def kaggle_row(imdb_id, genres, title=None):
  return [imdb_id, f"http://www.imdb.com/title/tt{imdb_id}", title or f"Movie {imdb_id}",
          "7.1", genres, "https://example.com/poster.jpg"]


def make_kaggle(directory: Path, n: int = 40, seed: int = 0, first_id: int = 100000,
                extra_rows=()) -> tuple[Path, dict[str, list[str]]]:
  """A Kaggle-layout CSV with `n` posters of 1-2 random genres. Returns the CSV path
  and {id: normalised genres}."""
  rng = np.random.default_rng(seed)
  posters = directory / "posters"
  posters.mkdir(parents=True, exist_ok=True)
  rows, expected = [], {}
  for i in range(n):
    imdb_id = str(first_id + i)
    genres = sorted(rng.choice(GENRES, size=int(rng.integers(1, 3)), replace=False))
    (posters / f"{imdb_id}.jpg").write_bytes(
        image_bytes(tuple(int(c) for c in rng.integers(0, 256, 3))))
    rows.append(kaggle_row(imdb_id, "|".join(genres)))
    expected[imdb_id] = [csv_rows.normalize_genre(g) for g in genres]
  path = write_csv(directory / "MovieGenre.csv", KAGGLE_HEADER, [*rows, *extra_rows])
  return path, expected


def read_split(out: Path, split: str) -> list[dict]:
  meta = records.read_metadata(out)
  return [records.decode_example(r) for path in records.split_files(out, meta, split)
          for r in tfrecord.iter_records(path)]


def genres_of(example: dict, vocabulary) -> list[str]:
  return [g for g, on in zip(vocabulary, example["labels"]) if on]


def tree_digest(directory: Path) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.iterdir())}


def leftovers(out: Path) -> list[str]:
  """Temporary siblings a conversion may have left beside `out`."""
  return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ------------------------------------------------------------------ round trip


@pytest.fixture(scope="module")
def kaggle_dataset(tmp_path_factory):
  directory = tmp_path_factory.mktemp("kaggle")
  csv_path, expected = make_kaggle(directory)
  out = directory / "out"
  report = conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0, examples_per_shard=8)
  return csv_path, expected, out, report


def test_round_trip_ids_labels_images(kaggle_dataset):
  csv_path, expected, out, report = kaggle_dataset
  meta = records.read_metadata(out)
  assert meta.vocabulary == tuple(VOCAB.split(","))
  seen = {}
  for split, info in meta.splits.items():
    examples = read_split(out, split)
    assert len(examples) == info.num_examples == report["summary"]["splits"][split]
    assert info.num_shards == max(1, -(-info.num_examples // 8))
    assert list(info.positives) == np.sum([e["labels"] for e in examples], 0).tolist()
    for ex in examples:
      assert ex["id"] not in seen
      seen[ex["id"]] = split
      assert genres_of(ex, meta.vocabulary) == expected[ex["id"]]
      assert ex["title"] == f"Movie {ex['id']}"
      # Valid RGB JPEGs pass through byte for byte when no resize is asked.
      assert ex["image"] == (csv_path.parent / "posters" / f"{ex['id']}.jpg").read_bytes()
      img = Image.open(io.BytesIO(ex["image"]))
      assert (img.mode, img.size) == ("RGB", (32, 32))
  assert set(seen) == set(expected)
  sizes = [info.num_examples for info in meta.splits.values()]
  assert sum(sizes) == 40 and np.abs(np.subtract(sizes, [32, 4, 4])).max() <= 2


def test_metadata_records_arguments_and_report(kaggle_dataset):
  csv_path, _, out, report = kaggle_dataset
  conversion = records.read_metadata(out).extra["conversion"]
  assert conversion["source_csv"] == str(csv_path.resolve())
  assert conversion["arguments"]["examples_per_shard"] == 8
  assert conversion["layout"]["kind"] == "kaggle"
  assert conversion["report"]["converted"] == 40
  assert report["status"] == "ok"
  assert json.loads((out / conv.REPORT_FILE).read_text()) == report
  assert json.loads(Path(f"{out}.report.json").read_text()) == report
  assert "converted" in conv.format_summary(report)


def test_every_genre_in_every_split(kaggle_dataset):
  _, expected, out, _ = kaggle_dataset
  meta = records.read_metadata(out)
  for genre, count in zip(meta.vocabulary, np.sum(
      [info.positives for info in meta.splits.values()], 0)):
    if count >= 10:  # enough for 10% of it to be at least one example
      assert all(info.positives[meta.vocabulary.index(genre)] > 0
                 for info in meta.splits.values()), (genre, meta.splits)


def test_tfds_builder_from_directory_reads_info(tmp_path):
  import tensorflow_datasets as tfds
  csv_path, _ = make_kaggle(tmp_path, n=20)
  out = tmp_path / "out"
  conv.convert(csv_path, out, vocabulary=VOCAB, splits="train:0.8,test:0.2",
               image_size="24x16", num_workers=0)
  info = tfds.builder_from_directory(os.fspath(out)).info
  meta = records.read_metadata(out)
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      s: meta.splits[s].num_examples for s in ("train", "test")}
  assert info.splits["train"].num_examples + info.splits["test"].num_examples == 20
  assert info.splits["train"].shard_lengths == list(meta.splits["train"].shard_lengths)
  assert set(info.features) == {"image", "id", "title", "labels", "genres"}
  assert info.features["image"].shape == (24, 16, 3)
  assert info.features["labels"].shape == (5,)
  for ex in read_split(out, "train"):
    img = Image.open(io.BytesIO(ex["image"]))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (16, 24))


def test_deterministic_and_independent_of_worker_count(tmp_path):
  csv_path, _ = make_kaggle(tmp_path, n=40)
  digests = []
  for name, seed, workers in [("a", 0, 0), ("b", 0, 2), ("c", 1, 0)]:
    conv.convert(csv_path, tmp_path / name, vocabulary=VOCAB, seed=seed,
                 num_workers=workers, image_size="16x16")
    digests.append({k: v for k, v in tree_digest(tmp_path / name).items()
                    if "tfrecord" in k})
  assert digests[0] == digests[1]
  assert digests[0] != digests[2]


# ------------------------------------------------------------------ splits


def test_stratified_split_puts_every_genre_in_every_split():
  rng = np.random.default_rng(0)
  labels = (rng.random((300, 8)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.04, 0.034, 0.5]).astype(np.uint8)
  labels[:10, 6] = 1  # a genre with just over 10 examples
  fractions = [0.8, 0.1, 0.1]
  for seed in range(5):
    plan = splits_lib.plan_splits(labels, fractions, seed)
    assert sorted(np.concatenate(plan).tolist()) == list(range(300))
    positives = np.array([labels[p].sum(0) for p in plan])
    wanted = np.outer(fractions, labels.sum(0))
    assert (positives > 0)[:, labels.sum(0) >= 10].all(), positives
    assert np.abs(positives - wanted).max() <= 1.5
    assert np.abs(np.array([len(p) for p in plan]) - np.multiply(fractions, 300)).max() <= 15
  assert all((a == b).all() for a, b in zip(splits_lib.plan_splits(labels, fractions, 3),
                                            splits_lib.plan_splits(labels, fractions, 3)))


def test_parse_splits_and_image_size():
  assert splits_lib.parse_splits("train:0.8,test:0.2") == {"train": 0.8, "test": 0.2}
  for bad in ["train:0.8,test:0.1", "train", "train:x", "train:1.2,test:-0.2", "a-b:1"]:
    with pytest.raises(conv.ConversionError, match="--splits"):
      splits_lib.parse_splits(bad)
  assert conv.parse_image_size("none") is None
  assert conv.parse_image_size("268x182") == (268, 182)
  with pytest.raises(conv.ConversionError, match="--image_size"):
    conv.parse_image_size("268")


def test_shards_fill_in_order_and_empty_split_gets_one_shard(tmp_path):
  writer = conv._SplitWriter(tmp_path, "train", 7, 2)
  for i in range(20):
    writer.write(str(i).encode(), np.array([1, 0]))
  info = writer.finish()
  assert info.shard_lengths == (7, 7, 6) and info.positives == (20, 0)
  assert [r.decode() for f in info.filenames() for r in tfrecord.iter_records(tmp_path / f)] \
      == [str(i) for i in range(20)]
  empty = conv._SplitWriter(tmp_path, "test", 7, 2).finish()
  assert empty.shard_lengths == (0,) and (tmp_path / empty.filenames()[0]).stat().st_size == 0


# ------------------------------------------------------------------ layouts


def test_genre_names_normalised():
  for name in ["Sci-Fi", "sci-fi", "Sci Fi", " SCI_FI ", "sci - fi"]:
    assert csv_rows.normalize_genre(name) == "sci-fi"


def test_vocabulary_choices():
  rows = [csv_rows.Row(i + 2, str(i), genres) for i, genres in enumerate(
      [("comedy", "drama"), ("drama",), ("drama", "horror"), ("comedy",), ("western",)])]
  assert csv_rows.choose_vocabulary("paper", rows) == csv_rows.PAPER_GENRES
  assert len(csv_rows.PAPER_GENRES) == 13 and csv_rows.PAPER_GENRES[10] == "sci-fi"
  assert csv_rows.choose_vocabulary("min_count:2", rows) == ("drama", "comedy")
  assert csv_rows.choose_vocabulary("min_count:1", rows) == ("drama", "comedy", "horror", "western")
  assert csv_rows.choose_vocabulary(["Sci Fi", "Drama", "drama"], rows) == ("sci-fi", "drama")
  with pytest.raises(conv.ConversionError, match="min_count:9"):
    csv_rows.choose_vocabulary("min_count:9", rows)


@pytest.mark.parametrize("unlabeled", ["drop", "keep"])
def test_unlabeled_rows(tmp_path, unlabeled):
  csv_path, _ = make_kaggle(tmp_path, n=20, extra_rows=[kaggle_row("555", "Western")])
  (tmp_path / "posters" / "555.jpg").write_bytes(image_bytes())
  report = conv.convert(csv_path, tmp_path / "out", vocabulary=VOCAB, unlabeled=unlabeled,
                        num_workers=0)
  examples = {e["id"]: e for s in ("train", "validation", "test")
              for e in read_split(tmp_path / "out", s)}
  if unlabeled == "drop":
    assert report["reasons"]["unlabeled"]["rows"] == [
        {"id": "555", "line": 22, "detail": "genres western are not in the vocabulary"}]
    assert "555" not in examples and report["summary"]["skipped"] == 0
  else:
    assert "unlabeled" not in report["reasons"]
    assert examples["555"]["labels"].tolist() == [0] * 5


def test_onehot_layout_detected(tmp_path):
  (tmp_path / "Images").mkdir()
  header = ["Id", "Genre", "Action", "Comedy", "Drama", "Sci Fi"]
  rows = []
  for i in range(12):
    hot = [int(i % 4 == j) for j in range(4)]
    rows.append([f"tt{i:07d}", str([g for g, h in zip(header[2:], hot) if h]), *hot])
    (tmp_path / "Images" / f"tt{i:07d}.jpg").write_bytes(image_bytes())
  rows.append(["tt9999998", "[]", "0", "yes", "1", "0"])  # not 0/1
  rows.append(["tt9999999", "[]", "0", "0", "0", "0"])  # no genre
  csv_path = write_csv(tmp_path / "train.csv", header, rows)
  report = conv.convert(csv_path, tmp_path / "out", vocabulary="min_count:1",
                        splits="train:0.5,test:0.5", num_workers=0, max_skipped_fraction=0.2)
  assert report["layout"]["kind"] == "onehot"
  assert report["layout"]["genre_columns"] == ["Action", "Comedy", "Drama", "Sci Fi"]
  assert report["vocabulary"] == ["action", "comedy", "drama", "sci-fi"]
  assert report["reasons"]["malformed_row"]["rows"] == [
      {"id": "tt9999998", "line": 14, "detail": "column 'Comedy': 'yes' is not 0 or 1"}]
  assert report["reasons"]["empty_genres"]["rows"] == [{"id": "tt9999999", "line": 15}]
  examples = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "test")
  assert {e["id"]: int(np.argmax(e["labels"])) for e in examples} == {
      f"tt{i:07d}": i % 4 for i in range(12)}


def test_custom_layout_from_flags(tmp_path):
  (tmp_path / "imgs" / "sub").mkdir(parents=True)
  absolute = tmp_path / "elsewhere.png"
  absolute.write_bytes(image_bytes(fmt="PNG"))
  rows = []
  for i in range(10):
    (tmp_path / "imgs" / "sub" / f"p{i}.jpg").write_bytes(image_bytes())
    rows.append([f"m{i}", f"sub/p{i}.jpg", "Drama; Comedy" if i % 2 else "Horror", f"T{i}"])
  rows.append(["m10", str(absolute), "drama", "Abs"])
  csv_path = write_csv(tmp_path / "list.csv", ["key", "file", "tags", "name"], rows)
  with pytest.raises(conv.ConversionError, match="--id_column"):
    conv.convert(csv_path, tmp_path / "out", image_dir=tmp_path / "imgs", num_workers=0)
  report = conv.convert(csv_path, tmp_path / "out", image_dir=tmp_path / "imgs",
                        id_column="key", image_column="file", genre_column="tags",
                        genre_separator=";", title_column="name", vocabulary="min_count:1",
                        splits="train:0.5,test:0.5", num_workers=0)
  assert report["summary"]["converted"] == 11 and report["vocabulary"] == [
      "drama", "comedy", "horror"]
  titles = {e["id"]: e["title"] for s in ("train", "test") for e in read_split(tmp_path / "out", s)}
  assert titles["m10"] == "Abs" and titles["m3"] == "T3"


def test_layout_errors_name_the_flag():
  with pytest.raises(conv.ConversionError, match="--genre_column.*--genre_columns"):
    csv_rows.detect_layout(["id", "tags"], [["1", "a|b"]])
  with pytest.raises(conv.ConversionError, match="--id_column"):
    csv_rows.detect_layout(["key", "Genre"], [["1", "Drama"]])
  with pytest.raises(conv.ConversionError, match="--layout=kaggle or --layout=onehot"):
    csv_rows.detect_layout(["imdbId", "Genre", "Action", "Drama"], [["1", "Drama", "0", "1"]])
  with pytest.raises(conv.ConversionError, match="--image_column=path: no such column"):
    csv_rows.detect_layout(["imdbId", "Genre"], [], image_column="path")
  assert csv_rows.detect_layout(["imdbId", "Genre", "Action", "Drama"],
                                [["1", "Drama", "0", "1"]],
                                layout="kaggle").genre_column == "Genre"


def test_latin1_csv_read_by_default_and_undecodable_rows_skipped(tmp_path):
  csv_path, _ = make_kaggle(tmp_path, n=20)
  text = csv_path.read_text().replace("Movie 100003", "Léon")
  csv_path.write_bytes(text.encode("latin-1"))
  report = conv.convert(csv_path, tmp_path / "auto", vocabulary=VOCAB, num_workers=0)
  assert report["encoding"] == "latin-1"
  titles = {e["id"]: e["title"] for s in ("train", "validation", "test")
            for e in read_split(tmp_path / "auto", s)}
  assert titles["100003"] == "Léon"
  report = conv.convert(csv_path, tmp_path / "utf8", vocabulary=VOCAB, encoding="utf-8",
                        num_workers=0, max_skipped_fraction=0.1)
  assert [(e["id"], e["line"]) for e in report["reasons"]["undecodable_text"]["rows"]] == [
      ("100003", 5)]
  assert report["summary"]["converted"] == 19


# ------------------------------------------------------------------ bad input


def _bomb() -> bytes:
  """A tiny JPEG whose header claims 60000x60000 pixels."""
  data = bytearray(image_bytes())
  sof = data.index(b"\xff\xc0")
  data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
  return bytes(data)


def _rgba_half_transparent() -> bytes:
  img = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
  img.paste((0, 0, 255, 0), (0, 0, 16, 32))  # left half: fully transparent blue
  out = io.BytesIO()
  img.save(out, "PNG")
  return out.getvalue()


DIRECTORY = object()
# id -> (file name, content, expected reason or None if converted)
MESSY_IMAGES = {
    "900001": (None, b"", "missing_image"),
    "900002": ("900002.jpg", b"", "empty_image"),
    "900003": ("900003.jpg", noisy_jpeg()[:400], "corrupt_image"),
    "900004": ("900004.jpg", bytes(range(256)) * 4, "corrupt_image"),
    "900005": ("900005.jpg", _bomb(), "decompression_bomb"),
    "900006": ("900006.jpg", image_bytes(size=(48, 48)), "decompression_bomb"),  # > max pixels
    "900007": ("900007.jpg", DIRECTORY, "unreadable_image"),
    "800001": ("800001.png", image_bytes(fmt="PNG"), None),  # found by extension
    "800002": ("800002.jpg", image_bytes(fmt="GIF"), None),  # content, not name, decides
    "800003": ("800003.webp", image_bytes(fmt="WEBP") if features.check("webp") else None,
               None),  # dropped below where PIL lacks WebP
    "800004": ("800004.jpg", image_bytes(mode="CMYK"), None),
    "800005": ("800005.jpg", image_bytes(mode="L"), None),
    "800006": ("800006.png", image_bytes(mode="P", fmt="PNG"), None),
    "800007": ("800007.png", _rgba_half_transparent(), None),
    "800008": ("800008.png", image_bytes(mode="I;16", fmt="PNG"), None),
}
if not features.check("webp"):
  del MESSY_IMAGES["800003"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  """A Kaggle download with every kind of bad row, converted with no skip limit."""
  directory = tmp_path_factory.mktemp("messy")
  _, good = make_kaggle(directory, n=20)  # rows at lines 2-21
  posters = directory / "posters"
  extra = []
  for imdb_id, (name, content, _) in MESSY_IMAGES.items():
    if content is DIRECTORY:
      (posters / name).mkdir()
    elif name:
      (posters / name).write_bytes(content)
    extra.append(kaggle_row(imdb_id, "Drama"))
  for imdb_id in ("700001", "700002", "700003", "700004"):
    (posters / f"{imdb_id}.jpg").write_bytes(image_bytes())
  extra += [
      kaggle_row("100000", "|".join(g.upper() for g in good["100000"])),  # same genres
      kaggle_row("700001", "Comedy"), kaggle_row("700001", "Horror"),  # conflicting
      kaggle_row("700002", "Drama")[:4],  # too few fields
      kaggle_row("700003", ""),  # no genres
      kaggle_row("700004", "Drama", title="CAFE_MARK"),  # made undecodable below
  ]
  csv_path, _ = make_kaggle(directory, n=20, extra_rows=extra)
  csv_path.write_bytes(csv_path.read_bytes().replace(b"CAFE_MARK", b"Caf\xe9"))
  out = directory / "out"
  report = conv.convert(csv_path, out, vocabulary=VOCAB, encoding="utf-8", num_workers=0,
                        max_skipped_fraction=1.0, max_image_pixels=2000)
  return report, out


def _reason_ids(report, reason):
  return [e["id"] for e in report["reasons"].get(reason, {}).get("rows", [])]


@pytest.mark.parametrize("reason", ["missing_image", "empty_image", "corrupt_image",
                                    "decompression_bomb", "unreadable_image"])
def test_bad_image_skipped_with_reason(messy, reason):
  report, _ = messy
  want = [i for i, (_, _, r) in MESSY_IMAGES.items() if r == reason]
  assert sorted(_reason_ids(report, reason)) == want
  for entry in report["reasons"][reason]["rows"]:
    assert entry["detail"] and entry["line"] > 21


def test_bad_rows_skipped_with_reason(messy):
  report, _ = messy
  first_extra = 22 + len(MESSY_IMAGES)  # line of the first non-image bad row
  assert report["reasons"]["duplicate"]["rows"] == [
      {"id": "100000", "line": first_extra, "detail": "same genres as line 2"}]
  assert [(e["id"], e["line"]) for e in report["reasons"]["conflicting_duplicate"]["rows"]] \
      == [("700001", first_extra + 1), ("700001", first_extra + 2)]
  assert report["reasons"]["malformed_row"]["rows"] == [
      {"id": "700002", "line": first_extra + 3, "detail": "4 fields, the header has 6"}]
  assert _reason_ids(report, "empty_genres") == ["700003"]
  assert _reason_ids(report, "undecodable_text") == ["700004"]
  assert report["reasons"]["duplicate"]["filtered"]
  assert not report["reasons"]["malformed_row"]["filtered"]


def test_odd_images_converted_to_rgb_jpeg(messy):
  report, out = messy
  examples = {e["id"]: e for s in ("train", "validation", "test") for e in read_split(out, s)}
  odd = [i for i, (_, _, reason) in MESSY_IMAGES.items() if reason is None]
  assert set(odd) <= set(examples)
  for imdb_id in odd:
    img = Image.open(io.BytesIO(examples[imdb_id]["image"]))
    assert (img.format, img.mode) == ("JPEG", "RGB"), imdb_id
    assert img.size == (32, 32), imdb_id
  rgba = np.asarray(Image.open(io.BytesIO(examples["800007"]["image"])), np.int32)
  assert (np.abs(rgba[:, :12] - 255) < 8).all()  # transparent half composited on white
  assert (np.abs(rgba[:, 20:] - [255, 0, 0]) < 24).all()
  cmyk = np.asarray(Image.open(io.BytesIO(examples["800004"]["image"])), np.int32)
  assert (np.abs(cmyk - [200, 40, 40]) < 40).all()
  assert report["summary"]["converted"] == 20 + len(odd)  # 100000's copy adds nothing


def test_skipped_fraction_over_limit_fails_but_reports(tmp_path):
  csv_path, _ = make_kaggle(tmp_path, n=20)
  for imdb_id in ("100001", "100005", "100009"):
    (tmp_path / "posters" / f"{imdb_id}.jpg").unlink()
  out = tmp_path / "out"
  with pytest.raises(conv.ConversionError, match="--max_skipped_fraction=0.1") as e:
    conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0, max_skipped_fraction=0.1)
  report = json.loads(Path(f"{out}.report.json").read_text())
  assert e.value.report == report and report["status"] == "failed"
  assert _reason_ids(report, "missing_image") == ["100001", "100005", "100009"]
  assert report["summary"]["skipped_fraction"] == pytest.approx(0.15)
  assert "missing_image" in conv.format_summary(report)
  assert not out.exists() and leftovers(out) == []
  ok = conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0, max_skipped_fraction=0.2)
  assert ok["summary"]["converted"] == 17


def test_no_usable_row_fails(tmp_path):
  (tmp_path / "posters").mkdir()
  csv_path = write_csv(tmp_path / "MovieGenre.csv", KAGGLE_HEADER,
                       [kaggle_row("1", ""), kaggle_row("2", "")])
  with pytest.raises(conv.ConversionError, match="no usable row"):
    conv.convert(csv_path, tmp_path / "out", num_workers=0)
  report = json.loads((tmp_path / "out.report.json").read_text())
  assert report["summary"]["reasons"] == {"empty_genres": 2}


# ------------------------------------------------------------------ output handling


def test_existing_output_untouched_by_failing_conversions(tmp_path, monkeypatch):
  csv_path, _ = make_kaggle(tmp_path, n=20)
  out = tmp_path / "out"
  conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0)
  before = tree_digest(out)
  with pytest.raises(conv.ConversionError, match="--overwrite"):
    conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(conv.ConversionError, match="no row could be converted"):
    conv.convert(csv_path, out, image_dir=tmp_path / "empty", vocabulary=VOCAB,
                 num_workers=0, overwrite=True)
  assert tree_digest(out) == before and leftovers(out) == []

  calls = []
  real = records.encode_example

  def interrupted(**kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return real(**kwargs)

  monkeypatch.setattr(records, "encode_example", interrupted)
  with pytest.raises(KeyboardInterrupt):
    conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0, overwrite=True, seed=3)
  assert tree_digest(out) == before and leftovers(out) == []
  assert json.loads((tmp_path / "out.report.json").read_text())["error"] == "KeyboardInterrupt"
  monkeypatch.setattr(records, "encode_example", real)

  conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0, overwrite=True, seed=3)
  assert records.read_metadata(out).extra["conversion"]["arguments"]["seed"] == 3
  assert leftovers(out) == [] and oct(out.stat().st_mode & 0o777) != "0o700"


def test_interrupted_first_conversion_leaves_nothing(tmp_path, monkeypatch):
  csv_path, _ = make_kaggle(tmp_path, n=10)

  def boom(**kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(records, "encode_example", boom)
  with pytest.raises(KeyboardInterrupt):
    conv.convert(csv_path, tmp_path / "out", vocabulary=VOCAB, num_workers=0)
  assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_overwrite_refuses_an_output_holding_the_inputs(tmp_path):
  csv_path, _ = make_kaggle(tmp_path, n=10)
  with pytest.raises(conv.ConversionError, match="contains the input"):
    conv.convert(csv_path, tmp_path, vocabulary=VOCAB, num_workers=0, overwrite=True)
  assert csv_path.exists()


def test_command_line_exit_codes(tmp_path):
  csv_path, _ = make_kaggle(tmp_path, n=12)
  (tmp_path / "empty").mkdir()

  def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "poster_cnn.data.convert", f"--csv={csv_path}",
         f"--output_dir={tmp_path / 'out'}", f"--vocabulary={VOCAB}", "--num_workers=0", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120)

  ok = cli("--splits=train:0.5,test:0.5")
  assert ok.returncode == 0, ok.stderr
  assert "conversion ok" in ok.stdout and "converted" in ok.stdout
  splits = records.read_metadata(tmp_path / "out").splits
  assert splits["train"].num_examples + splits["test"].num_examples == 12
  exists = cli()
  assert exists.returncode == 1 and "--overwrite" in exists.stderr
  failed = cli(f"--image_dir={tmp_path / 'empty'}", "--overwrite")
  assert failed.returncode == 1 and "missing_image" in failed.stdout
