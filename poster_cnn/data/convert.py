"""CSV + poster folder -> sharded TFRecord dataset in the TFDS layout.

    poster-cnn-convert --csv=DATA/MovieGenre.csv --output_dir=DATA/posters_tfrecord
    poster-cnn-convert --csv=train.csv --image_dir=Images --vocabulary=min_count:100 \\
        --splits=train:0.8,test:0.2 --image_size=268x182 --output_dir=OUT

Layouts recognised from the header: Kaggle's `imdbId,...,Genre` (pipe-separated genres,
posters `<image_dir>/<imdbId>.jpg`) and one-hot (an id column plus one 0/1 column per
genre, e.g. `Id,Genre,Action,Adventure,...`). Other CSVs: --id_column, --genre_column
(+ --genre_separator) or --genre_columns, --image_column.

Every data row reaches the output or is listed in the report under a reason:
malformed_row (a line the CSV parser cannot read as one row, e.g. an unbalanced quote:
it alone is skipped, parsing resumes on the next line), undecodable_text, invalid_id
(an id holding '/' or '\\': ids are never paths), empty_genres, conflicting_duplicate
(CSV rows);
missing_image, unreadable_image, empty_image, corrupt_image, decompression_bomb
(images); duplicate, unlabeled (FILTERED: the user's choices, not counted towards
--max_skipped_fraction, which fails the run above that fraction of the other rows).
PNG, GIF, WebP, CMYK, greyscale, palette and 16-bit images become RGB JPEGs
(transparency composited on white); valid RGB JPEGs pass through byte for byte unless
--image_size asks for a resize.

The report goes to `<output_dir>.report.json` beside the output on every run that reads
the CSV (failed runs too, to say why) and into a published dataset as
`conversion_report.json`; metadata.json keeps its counts and the arguments.

--overwrite replaces only a directory holding a dataset this converter wrote, never a
file or another folder. A conversion killed mid-run (SIGKILL) leaves its staging
directory beside the output; the next conversion to that output removes it (and puts
back an old dataset an interrupted swap had moved aside). SIGTERM cleans up like Ctrl-C.

Stages: read the CSV once (ids, genres, titles); drop duplicates; choose the vocabulary
(`csv_rows`); assign splits by iterative stratification (`splits`); convert images in
worker processes (`images`), in split order, streaming into shards in a temporary
directory beside the output (`publish`); write metadata; rename the directory into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import tempfile
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import logging

from poster_cnn import interrupts
from poster_cnn.data import csv_rows, images, publish, records, tfrecord
from poster_cnn.data import split_file as split_file_lib
from poster_cnn.data import splits as splits_lib
# What convert() raises, importable beside it.
from poster_cnn.data.csv_rows import ConversionError

REPORT_FILE = "conversion_report.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
IMAGE_DIR_NAMES = ("posters", "images", "Images", "SampleMoviePosters")


# ------------------------------------------------------------------ arguments


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


# ------------------------------------------------------------------ writing


def _candidates(row: csv_rows.Row, image_dir: Path) -> tuple[str, ...]:
  """Paths to try for a row's image, in order."""
  if row.image is not None:
    path = Path(row.image)
    return (str(path if path.is_absolute() else image_dir / path),)
  return tuple(str(image_dir / f"{row.id}{ext}") for ext in IMAGE_EXTENSIONS)


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


def write_splits(directory: Path, rows: list[csv_rows.Row], labels: np.ndarray,
                 plan: list[np.ndarray], split_names: Sequence[str],
                 vocabulary: Sequence[str], image_dir: Path, opts: images.JpegOptions,
                 num_workers: int, examples_per_shard: int,
                 report: csv_rows.Report) -> dict[str, records.SplitInfo]:
  """Converts every planned row's image and writes the shards of every split."""
  order = np.concatenate(plan) if plan else np.zeros(0, np.int64)
  split_of = np.concatenate([np.full(len(p), s) for s, p in enumerate(plan)])
  writers = [_SplitWriter(directory, name, examples_per_shard, len(vocabulary))
             for name in split_names]
  tasks = (_candidates(rows[i], image_dir) for i in order)
  progress = _Progress(len(order))
  results = images.converted_images(tasks, len(order), opts, num_workers)
  with contextlib.closing(results):
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


def is_converted_dataset(path: Path) -> bool:
  """Whether `path` is a directory holding a dataset this converter wrote (its TFDS info
  and a metadata.json recording the conversion)."""
  try:
    meta = json.loads((path / records.METADATA_FILE).read_text())
    return (path / records.INFO_FILE).is_file() and isinstance(meta, dict) and (
        "conversion" in meta)
  except (OSError, ValueError):
    return False


def _check_output(output_dir: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
  """Refuses to replace an existing output without --overwrite, one holding inputs,
  and anything but a dataset this converter wrote (a file, another folder)."""
  if not output_dir.exists():
    return
  if output_dir.is_dir() and not any(output_dir.iterdir()):
    return  # an empty directory holds nothing to lose
  for path in inputs:
    if path.resolve().is_relative_to(output_dir.resolve()):
      raise ConversionError(f"--output_dir={output_dir} contains the input {path}: "
                            "--overwrite would delete it; choose another --output_dir")
  if not output_dir.is_dir():
    raise ConversionError(f"--output_dir={output_dir} is a file, not a dataset: it is "
                          "never replaced; choose another --output_dir")
  if not is_converted_dataset(output_dir):
    raise ConversionError(f"--output_dir={output_dir} is a folder that holds no dataset "
                          f"written by poster-cnn-convert (no {records.METADATA_FILE} "
                          "recording a conversion): it is never replaced, even with "
                          "--overwrite; choose another --output_dir")
  if not overwrite:
    raise ConversionError(f"--output_dir={output_dir} exists: pass --overwrite to replace it "
                          "(it is replaced only once the new dataset is complete)")


def _check_writable(output_dir: Path) -> None:
  """Fails before the CSV is read where the output's folder cannot be written."""
  try:
    publish.check_writable(output_dir)
  except OSError as e:
    where = e.filename or output_dir.parent
    raise ConversionError(f"--output_dir={output_dir}: cannot write there "
                          f"({where}: {e.strerror or e})") from None


# ------------------------------------------------------------------ report


def _write_report(path: Path, report: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
  os.replace(tmp, path)


def _jsonable(value):
  """`value` as JSON reads it back: tuples as lists, paths as strings."""
  return json.loads(json.dumps(value, default=str))


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


def _plan_rows(
    text: str, report: csv_rows.Report, result: dict, layout_flags: dict, vocabulary,
    unlabeled: str, fractions: dict[str, float], seed: int, image_dir: Path,
    fixed_splits: split_file_lib.SplitFile | None = None,
) -> tuple[list[csv_rows.Row], np.ndarray, tuple[str, ...], list]:
  """CSV text -> (rows, uint8 labels (n, k), vocabulary, row indices per split);
  fills `result`'s layout and vocabulary as soon as they are known."""
  layout, rows = csv_rows.read_rows(text, report, **layout_flags)
  result["layout"] = _jsonable(dataclasses.asdict(layout))
  rows = csv_rows.drop_duplicates(rows, report)
  vocab = csv_rows.choose_vocabulary(vocabulary, rows)
  result["vocabulary"] = list(vocab)
  rows, labels = csv_rows.label_rows(rows, vocab, unlabeled, report)
  if not rows:
    raise ConversionError(f"no usable row in the CSV; see {result['report_path']}")
  if not image_dir.is_dir() and any(r.image is None or not Path(r.image).is_absolute()
                                    for r in rows):
    raise ConversionError(f"--image_dir={image_dir}: not a directory")
  result["genres_without_rows"] = [g for g, n in zip(vocab, labels.sum(0)) if n == 0]
  if result["genres_without_rows"]:
    logging.warning("vocabulary genres without any row: %s", result["genres_without_rows"])
  logging.info("%d usable rows (%s layout), %d genres", len(rows), layout.kind, len(vocab))
  if fixed_splits is not None:
    return rows, labels, vocab, split_file_lib.plan_from_file([r.id for r in rows],
                                                              fixed_splits, seed)
  return rows, labels, vocab, splits_lib.plan_splits(labels, list(fractions.values()), seed)


def _check_converted(summary: dict, max_skipped_fraction: float, report_path: Path) -> None:
  if summary["converted"] == 0:
    raise ConversionError(f"no row could be converted; see {report_path}")
  if summary["skipped_fraction"] > max_skipped_fraction:
    top = ", ".join(f"{r} {n}" for r, n in summary["reasons"].items()
                    if r not in csv_rows.FILTERED)
    raise ConversionError(
        f"{summary['skipped']} of {summary['rows'] - summary['filtered']} rows "
        f"({summary['skipped_fraction']:.1%}) were skipped ({top}), more than "
        f"--max_skipped_fraction={max_skipped_fraction}; see {report_path} for the rows, "
        "then fix the input or raise --max_skipped_fraction")


def _convert_and_upload(remote: str, convert_to: Callable[[str], dict]) -> dict:
  """Object storage has no rename to publish with: the dataset is converted in a local
  temporary folder, then uploaded, shards first and the metadata files last, so a
  reader finds no dataset (read_metadata fails, naming the file) until it is whole.
  The report goes to `<remote>.report.json` as well."""
  from poster_cnn import storage
  storage.check(remote)
  target = storage.path(remote)
  if (target / records.INFO_FILE).exists() or (target / records.METADATA_FILE).exists():
    raise ConversionError(f"--output_dir={remote} holds a dataset; remove it first (object "
                          "storage cannot replace a folder in one step)")
  with tempfile.TemporaryDirectory(prefix="poster_cnn-convert-") as tmp:
    local = os.path.join(tmp, target.name or "dataset")
    result = convert_to(local)
    last = (records.INFO_FILE, records.METADATA_FILE)
    fs = storage.filesystem(remote)
    for name in sorted(os.listdir(local), key=lambda n: n in last):
      fs.put_file(os.path.join(local, name), os.fspath(target / name))
    fs.put_file(f"{local}.report.json", f"{remote}.report.json")
  return {**result, "output_dir": remote, "report_path": f"{remote}.report.json"}


def convert(csv_path: str | os.PathLike, output_dir: str | os.PathLike, *,
            image_dir: str | os.PathLike | None = None, layout: str = "auto",
            id_column: str | None = None, image_column: str | None = None,
            title_column: str | None = None, genre_column: str | None = None,
            genre_columns: Sequence[str] | None = None, genre_separator: str = "|",
            encoding: str = "auto", vocabulary: str | Sequence[str] = "paper",
            unlabeled: str = "drop",
            splits: str | dict[str, float] = splits_lib.DEFAULT_SPLITS,
            split_file: str | os.PathLike | None = None,
            seed: int = 0, image_size: str | Sequence[int] | None = None,
            jpeg_quality: int = 95, image_format: str = "jpeg",
            examples_per_shard: int = 1000,
            num_workers: int | None = None, max_skipped_fraction: float = 0.05,
            max_image_pixels: int = images.DEFAULT_MAX_IMAGE_PIXELS,
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
  if "://" in os.fspath(output_dir):  # gs://, s3://: converted here, then uploaded
    params = dict(locals())
    remote = os.fspath(params.pop("output_dir"))
    return _convert_and_upload(remote, lambda local: convert(output_dir=local, **params))
  arguments = _jsonable(locals())
  layout_flags = dict(layout=layout, id_column=id_column, image_column=image_column,
                      title_column=title_column, genre_column=genre_column,
                      genre_columns=genre_columns, genre_separator=genre_separator)
  fractions, size = splits_lib.parse_splits(splits), parse_image_size(image_size)
  # A fixed split (split_file.py) replaces --splits' fractions; its names are the splits.
  fixed_splits = split_file_lib.read_split_file(split_file) if split_file else None
  if fixed_splits is not None:
    fractions = {name: math.nan for name in fixed_splits.names}
  num_workers = default_num_workers() if num_workers is None else num_workers
  _check_arguments(unlabeled=unlabeled, jpeg_quality=jpeg_quality, num_workers=num_workers,
                   examples_per_shard=examples_per_shard, max_image_pixels=max_image_pixels,
                   max_skipped_fraction=max_skipped_fraction)
  if image_format not in ("jpeg", "raw") or (image_format == "raw" and size is None):
    raise ConversionError(f"--image_format={image_format}: expected jpeg, or raw with an "
                          "--image_size (raw pixels need one size for every poster)")
  csv_path, output_dir = Path(csv_path), Path(output_dir)
  image_dir = Path(image_dir) if image_dir else next(
      (p for p in (csv_path.parent / n for n in IMAGE_DIR_NAMES) if p.is_dir()), csv_path.parent)
  publish.clean_leftovers(output_dir)
  _check_output(output_dir, overwrite, [csv_path, image_dir])
  _check_writable(output_dir)
  text, used_encoding = csv_rows.read_csv_text(csv_path, encoding)

  start, report = time.monotonic(), csv_rows.Report()
  report_path = Path(f"{output_dir}.report.json")
  result = {"status": "failed", "error": None, "csv": str(csv_path),
            "image_dir": str(image_dir), "output_dir": str(output_dir),
            "report_path": str(report_path), "encoding": used_encoding, "layout": None,
            "vocabulary": None, "arguments": arguments}
  split_sizes = {name: 0 for name in fractions}
  stage = None
  try:
    rows, labels, vocab, plan = _plan_rows(text, report, result, layout_flags, vocabulary,
                                           unlabeled, fractions, seed, image_dir, fixed_splits)
    del text
    logging.info("converting %d posters from %s with %d workers", len(rows), csv_path,
                 num_workers)
    with publish.staging(output_dir) as stage:
      tmp = stage.path
      infos = write_splits(tmp, rows, labels, plan, list(fractions), vocab, image_dir,
                           images.JpegOptions(size, jpeg_quality, max_image_pixels,
                                              raw=image_format == "raw"),
                           num_workers, examples_per_shard, report)
      split_sizes = {name: info.num_examples for name, info in infos.items()}
      summary = report.summary(split_sizes)
      _check_converted(summary, max_skipped_fraction, report_path)
      summary["seconds"] = round(time.monotonic() - start, 3)
      result.update(status="ok", summary=summary, reasons=report.listing())
      records.write_metadata(tmp, records.DatasetMetadata(
          vocabulary=vocab, splits=infos, image_size=size,
          extra={"image_format": image_format,
                 "conversion": {"source_csv": str(csv_path.resolve()),
                                "image_dir": str(image_dir.resolve()),
                                "encoding": used_encoding, "layout": result["layout"],
                                "arguments": arguments, "report": summary}}),
          description=f"Movie posters with multi-hot genre labels, converted from {csv_path}.")
      _write_report(tmp / REPORT_FILE, result)
      with interrupts.deferred_interrupts():  # published and reported as such, or neither
        stage.publish()
        try:
          _write_report(report_path, result)
        except OSError as e:  # the dataset holds the same report
          logging.warning("could not write %s: %s", report_path, e)
  except BaseException as e:  # the report must say why, whatever stopped the run
    if stage is not None and stage.published:  # interrupted after the swap: it stands
      e.published = True
      raise
    result.update(status="failed", error=str(e) or type(e).__name__,
                  summary=report.summary(split_sizes), reasons=report.listing())
    result["summary"]["seconds"] = round(time.monotonic() - start, 3)
    try:
      _write_report(report_path, result)
    except OSError as write_error:
      logging.warning("could not write %s: %s", report_path, write_error)
    if isinstance(e, OSError):  # e.g. the disk filled up: nothing was published
      raise ConversionError(f"writing {output_dir} failed: {e}; nothing was published",
                            result) from None
    if isinstance(e, ConversionError):
      e.report = result
    raise
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
      splits=text("splits", splits_lib.DEFAULT_SPLITS,
                  "name:fraction,... (train:0.8,test:0.2: the paper)."),
      split_file=text("split_file", None, "A fixed split instead of --splits: a CSV of "
                      "id,split (e.g. configs/splits/movie_posters.csv); see split_file.py."),
      seed=number("seed", 0, "Seed of the split assignment and order."),
      image_size=text("image_size", "none", "HEIGHTxWIDTH to resize to, or none."),
      jpeg_quality=number("jpeg_quality", 95, "Quality of re-encoded JPEGs."),
      image_format=flags.DEFINE_enum(
          "image_format", "jpeg", ["jpeg", "raw"], "How images are stored: jpeg, or raw "
          "uint8 pixels (needs --image_size; about 13x the disk of the Kaggle JPEGs at "
          "224x224, no decoding at training time: docs/BENCHMARKS.md)."),
      examples_per_shard=number("examples_per_shard", 1000, "Examples per shard."),
      num_workers=number("num_workers", None, "Image worker processes; default: the CPUs "
                         "available; 0: convert in this process."),
      max_skipped_fraction=flags.DEFINE_float(
          "max_skipped_fraction", 0.05, "Fail when more of the rows not filtered (duplicates, "
          "no genre in the vocabulary) are skipped."),
      max_image_pixels=number("max_image_pixels", images.DEFAULT_MAX_IMAGE_PIXELS,
                              "Larger images are skipped as decompression bombs."),
      overwrite=bool_("overwrite", False, "Replace an existing --output_dir, once the new "
                      "dataset is complete."),
  )


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised like Ctrl-C so that the staging directory and workers are cleaned up."""


def _raise_terminated(signum, frame):
  raise Terminated()


def _outcome(interrupt: BaseException, output_dir: str) -> str:
  if getattr(interrupt, "published", False):
    return f"{output_dir} had been written in full"
  return "no dataset written"


def run() -> None:
  """The poster-cnn-convert console script: exit status 1 when the conversion fails."""
  from absl import app
  holders = _define_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    signal.signal(signal.SIGTERM, _raise_terminated)
    output = holders["output_dir"].value
    try:
      report = convert(**{name: holder.value for name, holder in holders.items()})
    except Terminated as e:
      print(f"poster-cnn-convert: terminated (SIGTERM); {_outcome(e, output)}", file=sys.stderr)
      return 143
    except ConversionError as e:
      if e.report is not None:
        print(format_summary(e.report))
      print(f"poster-cnn-convert: error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt as e:
      print(f"poster-cnn-convert: interrupted; {_outcome(e, output)}", file=sys.stderr)
      return 130
    print(format_summary(report))
    return 0

  app.run(main)


if __name__ == "__main__":
  run()
