"""Metric logging without TensorFlow: TensorBoard event files and JSONL.

Only process 0 writes; on other processes the writer is a no-op, so the
training loop can call it unconditionally. TensorBoard gets the scalars (train
and validation loss side by side under `loss`), the run's hyperparameters, and
a grid of validation posters captioned with their true and predicted genres.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes scalars to `<workdir>/tensorboard/` and `<workdir>/metrics.jsonl`.

  Each JSONL line is {"step": int, "split": str, "time": float, <name>: value}.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # imported here: only process 0 needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")

  def write(self, step: int, scalars: dict, *, split: str = "train") -> None:
    """Logs finite-or-not float scalars under `<split>/<name>`; non-scalars are skipped."""
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": time.time()}
    for name, value in scalars.items():
      if isinstance(value, (list, tuple, dict, str)) or value is None:
        continue
      value = float(np.asarray(value))
      row[name] = value if math.isfinite(value) else str(value)
      # Losses side by side ('loss/train', 'loss/validation'); the rest per split.
      tag = f"loss/{split}" if name == "loss" else f"{split}/{name}"
      self._tb.add_scalar(tag, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def write_hparams(self, config, final: dict) -> None:
    """The config's scalar fields as TensorBoard hyperparameters, with the final metrics."""
    if not self.enabled:
      return
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
               for k, v in flatten_config(config.to_dict()).items()}
    metrics = {f"hparam/{k}": float(v) for k, v in final.items()
               if isinstance(v, (int, float)) and math.isfinite(float(v))}
    self._tb.add_hparams(hparams, metrics, name="hparams")

  def write_posters(self, step: int, split: str, images: np.ndarray, captions: list[str]
                    ) -> None:
    """A grid of posters (uint8 (n, H, W, 3)), each above its caption lines."""
    if self.enabled and len(images):
      self._tb.add_image(f"{split}/posters", poster_grid(images, captions), int(step),
                         dataformats="HWC")
      self._tb.add_text(f"{split}/posters", "\n\n".join(
          f"{i}. " + c.replace("\n", " -- ") for i, c in enumerate(captions)), int(step))

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All rows of a run's metrics.jsonl (for plots and tests)."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def flatten_config(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def captions(labels, scores, vocabulary, k: int = 2) -> list[str]:
  """'true: a, b\npred: c 0.81, a 0.40' per example, from {0,1} (n, K) and float (n, K)."""
  out = []
  for y, s in zip(np.asarray(labels), np.asarray(scores)):
    top = np.argsort(-s, kind="stable")[:k]
    true = ", ".join(g for g, v in zip(vocabulary, y) if v) or "-"
    out.append(f"true: {true}\npred: " + ", ".join(f"{vocabulary[i]} {s[i]:.2f}" for i in top))
  return out


def poster_grid(images: np.ndarray, captions: list[str], *, cell: int = 160,
                columns: int = 4) -> np.ndarray:
  """uint8 (n, H, W, 3) posters -> one uint8 image, each poster scaled into a `cell`-wide
  tile above its caption (PIL's default font)."""
  from PIL import Image, ImageDraw
  n = len(images)
  h, w = images.shape[1:3]
  tile_h = max(1, round(cell * h / w))
  text_h = 14 * max(c.count("\n") + 1 for c in captions) + 6
  rows = -(-n // columns)
  grid = Image.new("RGB", (columns * cell, rows * (tile_h + text_h)), "white")
  draw = ImageDraw.Draw(grid)
  for i, (img, caption) in enumerate(zip(images, captions)):
    x, y = i % columns * cell, i // columns * (tile_h + text_h)
    grid.paste(Image.fromarray(np.asarray(img, np.uint8)).resize((cell, tile_h)), (x, y))
    draw.multiline_text((x + 3, y + tile_h + 3), caption, fill="black", spacing=2)
  return np.asarray(grid)
