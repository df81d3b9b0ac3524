"""Shared fixtures: tiny converted datasets written straight through the record writer.

Writing records directly (not through the converter) keeps pipeline and
training tests independent of conversion, and lets them pick shard layouts.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # configs/ is importable from the repository root
  sys.path.insert(0, REPO)

from poster_cnn.data import records, tfrecord  # noqa: E402

VOCAB = ("red", "green", "blue", "bright")


def _poster(labels: np.ndarray, rng: np.random.Generator, size: int) -> bytes:
  """A poster whose colour channels carry its labels, plus noise."""
  h, w = size * 3 // 2, size
  base = rng.integers(0, 80, size=(h, w, 3)).astype(np.float32)
  for c in range(3):
    if labels[c]:
      base[..., c] += 120
  if labels[3]:
    base += 50
  buf = io.BytesIO()
  Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def write_dataset(directory, split_sizes: dict[str, int], *, shards: int = 2,
                  size: int = 16, seed: int = 0,
                  vocabulary: tuple[str, ...] = VOCAB) -> records.DatasetMetadata:
  """A dataset of `split_sizes` examples per split with learnable colour labels.

  Example ids are '<split>-<i>' so tests can check coverage exactly. The posters
  are drawn from labels over VOCAB; `vocabulary` (VOCAB's genres in another
  order, fewer of them, or others, which are never positive) is what is stored,
  so the same seed gives the same posters under any vocabulary.
  """
  columns = [VOCAB.index(g) if g in VOCAB else None for g in vocabulary]
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  splits = {}
  for split, n in split_sizes.items():
    labels = (rng.random((n, len(VOCAB))) < 0.4).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    stored = np.stack([labels[:, c] if c is not None else np.zeros(n, np.uint8)
                       for c in columns], axis=1)
    lengths, num_bytes = [], 0
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
      path = os.path.join(directory, records.shard_filename(split, s, shards))
      with tfrecord.TFRecordWriter(path) as w:
        for i in range(bounds[s], bounds[s + 1]):
          w.write(records.encode_example(image=_poster(labels[i], rng, size),
                                         id=f"{split}-{i}", title=f"Movie {i}",
                                         labels=stored[i], vocabulary=vocabulary))
      lengths.append(int(bounds[s + 1] - bounds[s]))
      num_bytes += w.num_bytes
    splits[split] = records.SplitInfo(split, n, tuple(lengths), num_bytes,
                                      tuple(int(x) for x in stored.sum(0)))
  meta = records.DatasetMetadata(vocabulary=tuple(vocabulary), splits=splits, image_size=None)
  records.write_metadata(directory, meta)
  return meta


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
  """train 96 / validation 24 / test 24 examples of 16x24 posters, 2 shards each."""
  d = tmp_path_factory.mktemp("tiny_dataset")
  write_dataset(d, {"train": 96, "validation": 24, "test": 24})
  return str(d)
