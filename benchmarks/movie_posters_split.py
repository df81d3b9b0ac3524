"""Re-creates configs/splits/movie_posters.csv, the fixed split of the real posters.

    .venv/bin/python benchmarks/movie_posters_split.py \
        --data=../shared/data/movie-posters --output=configs/splits/movie_posters.csv

Every poster of MovieGenre.csv gets a split by iterative stratification on the paper's
13 genres (poster_cnn.data.splits.stratified_split; posters with none of the 13 are
spread by count), 70% train / 15% validation / 15% test, seed 0. Posters whose image
files are byte-identical (the same artwork used for related titles) are then moved into
the split of the first of them, so no artwork is both trained on and tested on. The file
lists validation and test by id and ends with '*,train' (split_file.py), keeping it small.
Prints per split its size and positives per genre.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import os

import numpy as np

from poster_cnn.data import csv_rows, splits

NAMES = ("train", "validation", "test")
FRACTIONS = (0.7, 0.15, 0.15)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data", default="../shared/data/movie-posters")
  parser.add_argument("--output", default="configs/splits/movie_posters.csv")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  with open(os.path.join(args.data, "MovieGenre.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  ids = [r["imdbId"].strip() for r in rows]
  if len(set(ids)) != len(ids):
    raise SystemExit("duplicate imdbIds in MovieGenre.csv")
  genres = [{csv_rows.normalize_genre(g) for g in r["Genre"].split("|")} for r in rows]
  labels = np.array([[g in gs for g in csv_rows.PAPER_GENRES] for gs in genres], bool)
  split = splits.stratified_split(labels, FRACTIONS, np.random.default_rng(args.seed))

  by_digest = collections.defaultdict(list)
  for i, key in enumerate(ids):
    with open(os.path.join(args.data, "posters", f"{key}.jpg"), "rb") as f:
      by_digest[hashlib.sha256(f.read()).hexdigest()].append(i)
  moved = 0
  for group in by_digest.values():
    for i in group[1:]:
      moved += split[i] != split[group[0]]
      split[i] = split[group[0]]

  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w", newline="") as f:
    out = csv.writer(f, lineterminator="\n")
    out.writerow(["imdbId", "split"])
    for s in (1, 2):
      for i in sorted(np.flatnonzero(split == s), key=lambda i: int(ids[i])):
        out.writerow([ids[i], NAMES[s]])
    out.writerow(["*", NAMES[0]])
  print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes); {moved} posters moved "
        "to the split of a byte-identical poster")
  print("split       posters  " + " ".join(f"{g[:6]:>6}" for g in csv_rows.PAPER_GENRES))
  for s, name in enumerate(NAMES):
    print(f"{name:<11} {np.sum(split == s):>7}  "
          + " ".join(f"{n:>6}" for n in labels[split == s].sum(0)))


if __name__ == "__main__":
  main()
