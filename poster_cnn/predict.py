"""Genres for poster image files, from a training workdir's checkpoint.

Files are streamed in batches, so a folder of any size runs in constant
memory; an unreadable file is reported and skipped, never fatal.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from poster_cnn import evaluate, metrics, train
from poster_cnn.data import images as image_files
from poster_cnn.data import pipeline

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


def expand_paths(patterns: Sequence[str]) -> Iterator[str]:
  """Files, folders (their images, sorted) and globs -> image paths."""
  for pattern in patterns:
    if os.path.isdir(pattern):
      for name in sorted(os.listdir(pattern)):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          yield os.path.join(pattern, name)
    elif any(c in pattern for c in "*?["):
      matches = sorted(glob.glob(pattern, recursive=True))
      if not matches:
        logging.warning("%s matches no file", pattern)
      yield from matches
    else:
      yield pattern


def _batches(paths: Iterable[str], size: int, opts: pipeline.ImageOptions,
             stored: image_files.JpegOptions, errors: list[dict]
             ) -> Iterator[tuple[list[str], np.ndarray]]:
  names, images = [], []
  for path in paths:
    try:
      with open(path, "rb") as f:
        # As the converter stored the training posters, then as the pipeline decodes them.
        data = image_files.to_jpeg(f.read(), stored)
      images.append(pipeline.decode_image(data, opts.height, opts.width, opts.resize))
      names.append(path)
    except Exception as e:  # PIL raises many types for bad files
      errors.append({"path": path, "error": f"{type(e).__name__}: {e}"})
      logging.warning("skipping %s: %s", path, e)
    if len(names) == size:
      yield names, np.stack(images)
      names, images = [], []
  if names:
    yield names, np.stack(images)


def predict_files(workdir: str, patterns: Sequence[str], *, step: str | int = "best",
                  top_k: int | None = None, batch_size: int | None = None
                  ) -> tuple[list[dict], list[dict]]:
  """Predicts genres for every image the patterns name.

  Returns:
    (predictions, errors). Each prediction: {'path', 'top_k': [[genre, prob], ...],
    'above_threshold': [genre, ...] (empty list if no calibrated thresholds),
    'probabilities': {genre: prob}}. Each error: {'path', 'error'}.
  """
  config, vocabulary, state, eval_fn, mesh, step = evaluate.load_for_inference(workdir, step)
  top_k = top_k or config.top_k
  thresholds = evaluate.read_thresholds(workdir, step, vocabulary)
  opts = train.image_options(config)
  size = batch_size or config.eval_batch_size
  num_devices = mesh.devices.size
  size = -(-size // num_devices) * num_devices
  predictions, errors = [], []
  stored = image_files.dataset_options(config.get("data_dir"))
  for names, images in _batches(expand_paths(patterns), size, opts, stored, errors):
    padded = np.zeros((size, *images.shape[1:]), np.uint8)
    padded[: len(images)] = images
    probs = np.asarray(eval_fn(state, train.global_batch({"image": padded}, mesh)))[: len(names)]
    top = metrics.top_k_predictions(probs, top_k)
    for name, p, t in zip(names, probs, top):
      order = np.argsort(-p, kind="stable")
      predictions.append({
          "path": name,
          "top_k": [[vocabulary[i], float(p[i])] for i in order if t[i]],
          "above_threshold": ([vocabulary[i] for i in order if p[i] >= thresholds[i]]
                              if thresholds is not None else []),
          "probabilities": {g: float(v) for g, v in zip(vocabulary, p)},
      })
  return predictions, errors


def format_table(predictions: list[dict]) -> str:
  lines = []
  for p in predictions:
    top = ", ".join(f"{g} {v:.2f}" for g, v in p["top_k"])
    extra = f"  | above threshold: {', '.join(p['above_threshold']) or '-'}"
    lines.append(f"{os.path.basename(p['path']):<24} {top}{extra}")
  return "\n".join(lines)
