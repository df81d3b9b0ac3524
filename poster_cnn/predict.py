"""Genres for poster image files, from a training workdir's checkpoint.

Files are streamed in batches, so a folder of any size runs in constant
memory; an unreadable file is reported and skipped. Patterns that name no
file (a missing path, an empty folder, a glob matching nothing) are errors,
as is a run where no file could be read.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from poster_cnn import inference, metrics
from poster_cnn.data import images as image_files
from poster_cnn.data import pipeline

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


class NothingToPredict(ValueError):
  """The patterns name no image file, or none of them could be read."""


def expand_paths(patterns: Sequence[str]) -> list[str]:
  """Files, folders (their images, sorted) and globs -> image paths.

  Raises NothingToPredict naming each pattern that matches no file.
  """
  paths, empty = [], []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = [os.path.join(pattern, name) for name in sorted(os.listdir(pattern))
               if name.lower().endswith(IMAGE_EXTENSIONS)]
      what = f"{pattern}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})"
    elif any(c in pattern for c in "*?["):
      found = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
      what = f"{pattern}: matches no file"
    else:
      found = [pattern] if os.path.isfile(pattern) else []
      what = f"{pattern}: no such file"
    if not found:
      empty.append(what)
    paths += found
  if empty:
    raise NothingToPredict("--images: " + "; ".join(empty))
  return paths


def _batches(paths: Iterable[str], size: int, opts: pipeline.ImageOptions,
             stored: image_files.JpegOptions, errors: list[dict]
             ) -> Iterator[tuple[list[str], np.ndarray]]:
  names, images = [], []
  fmt = "raw" if stored.raw else "jpeg"
  carrier = pipeline.carrier_size(stored.size, opts, fmt)
  for path in paths:
    try:
      with open(path, "rb") as f:
        # As the converter stored the training posters, then as the pipeline decodes
        # them; the eval step resizes them on the device (Predictor.eval_fn).
        data = image_files.to_stored(f.read(), stored)
      images.append(pipeline.decode_stored(data, carrier, fmt, opts.resize))
      names.append(path)
    except Exception as e:  # PIL raises many types for bad files
      errors.append({"path": path, "error": f"{type(e).__name__}: {e}"})
      logging.warning("skipping %s: %s", path, e)
    if len(names) == size:
      yield names, np.stack(images)
      names, images = [], []
  if names:
    yield names, np.stack(images)


def predict_files(workdir, patterns: Sequence[str], *, step: str | int = "best",
                  top_k: int | None = None, batch_size: int | None = None
                  ) -> tuple[list[dict], list[dict]]:
  """Predicts genres for every image the patterns name.

  Args:
    workdir: a training workdir (path or `run_dir.RunDir`).

  Returns:
    (predictions, errors). Each prediction: {'path', 'top_k': [[genre, prob], ...],
    'above_threshold': [genre, ...] (empty list if no calibrated thresholds),
    'probabilities': {genre: prob}, 'checkpoint': {'path', 'step'}}. Each error:
    {'path', 'error'}.

  Raises:
    NothingToPredict when a pattern names no file or no file could be read;
    ValueError for a `top_k` outside [1, number of genres].
  """
  from poster_cnn.run_dir import RunDir
  run = workdir if isinstance(workdir, RunDir) else RunDir(workdir)
  paths = expand_paths(patterns)  # before the model is restored: errors come first
  step = run.resolve_step(step)
  predictor = inference.Predictor(run, step)
  config, vocabulary = predictor.config, predictor.vocabulary
  top_k = config.top_k if top_k is None else top_k
  if not 1 <= top_k <= len(vocabulary):
    raise ValueError(f"--top_k={top_k} must be between 1 and the {len(vocabulary)} genres")
  thresholds = run.read_thresholds(step, vocabulary)
  opts = inference.image_options(config)
  size = predictor.batch_size(batch_size or config.eval_batch_size)
  predictions, errors = [], []
  stored = image_files.dataset_options(config.get("data_dir"))
  for names, images in _batches(paths, size, opts, stored, errors):
    probs = predictor.probabilities(images, pad_to=size)
    top = metrics.top_k_predictions(probs, top_k)
    for name, p, t in zip(names, probs, top):
      order = np.argsort(-p, kind="stable")
      predictions.append({
          "path": name,
          "top_k": [[vocabulary[i], float(p[i])] for i in order if t[i]],
          "above_threshold": ([vocabulary[i] for i in order if p[i] >= thresholds[i]]
                              if thresholds is not None else []),
          "probabilities": {g: float(v) for g, v in zip(vocabulary, p)},
          "checkpoint": predictor.checkpoint,
      })
  if not predictions:
    raise NothingToPredict(f"none of the {len(paths)} file(s) could be read as an image: "
                           + "; ".join(f"{e['path']}: {e['error']}" for e in errors[:5]))
  return predictions, errors


def format_table(predictions: list[dict]) -> str:
  """One line per poster, after a line naming the checkpoint."""
  lines = []
  if predictions:
    ckpt = predictions[0]["checkpoint"]
    lines.append(f"checkpoint: {ckpt['path']} (step {ckpt['step']})")
  for p in predictions:
    top = ", ".join(f"{g} {v:.2f}" for g, v in p["top_k"])
    extra = f"  | above threshold: {', '.join(p['above_threshold']) or '-'}"
    lines.append(f"{os.path.basename(p['path']):<24} {top}{extra}")
  return "\n".join(lines)


def format_csv(predictions: list[dict]) -> str:
  """CSV: path, the top-k and thresholded genres, one probability column per genre, and
  the checkpoint (path, step) on every row."""
  out = io.StringIO()
  writer = csv.writer(out)
  genres = list(predictions[0]["probabilities"]) if predictions else []
  writer.writerow(["path", "top_k", "above_threshold", *genres, "checkpoint", "step"])
  for p in predictions:
    writer.writerow([p["path"], "|".join(f"{g}:{v:.4f}" for g, v in p["top_k"]),
                     "|".join(p["above_threshold"]),
                     *(f"{p['probabilities'][g]:.6f}" for g in genres),
                     p["checkpoint"]["path"], p["checkpoint"]["step"]])
  return out.getvalue()


def format_predictions(predictions: list[dict], fmt: str) -> str:
  """'table', 'json' or 'csv' text of `predict_files`' predictions."""
  if fmt == "json":
    return json.dumps(predictions, indent=2)
  if fmt == "csv":
    return format_csv(predictions)
  return format_table(predictions)


def check_output(path: str) -> None:
  """Fails before any work when `path` cannot be written (ValueError naming it)."""
  from poster_cnn import storage
  if storage.is_remote(path):  # gs://, s3://: only whether this install can reach it
    storage.check(path)
    return
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"--output={path} is a folder, not a file")
  if not os.path.isdir(parent):
    raise ValueError(f"--output={path}: folder {parent} does not exist")
  if not os.access(parent, os.W_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
    raise ValueError(f"--output={path} is not writable")


def write_output(path: str, text: str) -> None:
  """Writes `text` through a temporary file and a rename; OSError -> ValueError naming it."""
  from poster_cnn import run_dir
  try:
    run_dir.atomic_write_bytes(path, text.encode("utf-8"))
  except OSError as e:
    raise ValueError(f"--output={path} could not be written: {e}") from None
