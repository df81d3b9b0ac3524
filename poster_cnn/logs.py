"""Metric logging without TensorFlow: TensorBoard event files and JSONL.

Only process 0 writes; on other processes the writer is a no-op, so the
training loop can call it unconditionally.
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
      self._tb.add_scalar(f"{split}/{name}", value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

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
