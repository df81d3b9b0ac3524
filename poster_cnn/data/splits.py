"""Train/validation/test assignment: the --splits spec and iterative stratification
of multi-label rows."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from poster_cnn.data import csv_rows

DEFAULT_SPLITS = "train:0.8,validation:0.1,test:0.1"


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
    raise csv_rows.ConversionError(
        f"--splits={spec}: expected name:fraction pairs with positive fractions summing "
        "to 1, e.g. train:0.8,validation:0.1,test:0.1")
  total = sum(fractions.values())
  return {n: f / total for n, f in fractions.items()}


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
