import csv
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from poster_cnn.data import synthetic


def _read(csv_path):
  with open(csv_path, newline="") as f:
    return list(csv.reader(f))


def _digest(directory):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      h.update(name.encode())
      h.update(open(os.path.join(root, name), "rb").read())
  return h.hexdigest()


def test_kaggle_layout_and_valid_posters(tmp_path):
  path = synthetic.generate(tmp_path, 40, seed=1, width=32)
  rows = _read(path)
  assert tuple(rows[0]) == synthetic.CSV_HEADER
  assert len(rows) == 41 and len({r[0] for r in rows[1:]}) == 40
  for row in rows[1:]:
    genres = row[4].split("|")
    assert 1 <= len(genres) <= 3 and set(genres) <= set(synthetic.GENRES)
    assert row[1].endswith(f"tt{int(row[0]):07d}") and 1.0 <= float(row[3]) <= 9.8
    with Image.open(tmp_path / "posters" / f"{row[0]}.jpg") as im:
      assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 48)


def test_deterministic_under_seed_and_worker_count(tmp_path):
  synthetic.generate(tmp_path / "a", 24, seed=3, width=32)
  synthetic.generate(tmp_path / "b", 24, seed=3, width=32, num_workers=2)
  synthetic.generate(tmp_path / "c", 24, seed=4, width=32)
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_to_overwrite(tmp_path):
  synthetic.generate(tmp_path, 2, width=16)
  with pytest.raises(ValueError, match="MovieGenre.csv exists"):
    synthetic.generate(tmp_path, 2, width=16)
  synthetic.generate(tmp_path, 3, width=16, overwrite=True)
  assert len(_read(tmp_path / "MovieGenre.csv")) == 4


def test_label_statistics_are_skewed_and_correlated():
  labels = synthetic.sample_labels(np.random.default_rng(0), 3000).astype(float)
  g = {name: labels[:, i] for i, name in enumerate(synthetic.GENRES)}
  assert g["Drama"].mean() > 4 * g["Short"].mean()
  assert 1 <= labels.sum(1).min() and labels.sum(1).max() <= 3
  # P(Adventure | Action) well above P(Adventure).
  assert g["Adventure"][g["Action"] == 1].mean() > 2 * g["Adventure"].mean()
  assert g["Romance"][g["Horror"] == 1].mean() < g["Romance"].mean()


def _features(image: Image.Image) -> np.ndarray:
  """Colour histograms of three horizontal bands: a deliberately weak feature."""
  x = np.asarray(image, np.float32) / 255
  bands = np.array_split(x, 3, axis=0)
  return np.concatenate([np.histogramdd(b.reshape(-1, 3), bins=3, range=[(0, 1)] * 3)[0].ravel()
                         / b[..., 0].size for b in bands])


def test_genres_leave_a_learnable_signature():
  """A linear probe on colour histograms beats the label prior on held-out posters."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import average_precision_score
  rng = np.random.default_rng(0)
  labels = synthetic.sample_labels(rng, 500)
  feats = np.stack([_features(synthetic.render_poster(l, rng, 32)) for l in labels])
  train, test = slice(0, 400), slice(400, 500)
  gains = []
  for k, name in enumerate(synthetic.GENRES):
    y = labels[:, k]
    if y[train].sum() < 15 or y[test].sum() < 3:
      continue
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(feats[train], y[train])
    ap = average_precision_score(y[test], probe.predict_proba(feats[test])[:, 1])
    gains.append(ap - y[test].mean())
  assert len(gains) >= 8
  assert np.mean(gains) > 0.15, gains
