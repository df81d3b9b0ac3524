"""Input pipeline throughput and memory.

Prints machine-readable lines:

  input data=sample examples=3570 workers=2 image=224 batch=32 img_per_s=512.3 peak_rss_mb=410.2 peak_pss_mb=350.1
  memory data=synthetic20000 examples=20000 workers=2 image=224 batches=300 peak_rss_mb=402.7 peak_pss_mb=340.3

`input` lines time --batches training batches (after --warmup batches, which
include starting the workers) with 0, 1, 2... worker processes. `memory` lines
read the same number of batches from converted synthetic sets of different
sizes, each in a fresh process: if the pipeline held the dataset, peak memory
would grow with it. Memory is sampled over the whole process tree (the reading
process and its grain workers) every 50 ms, as summed RSS and summed PSS.

    python benchmarks/input_throughput.py                       # shared sample + 1K/20K synthetic
    python benchmarks/input_throughput.py --data_dir=DATA --memory_sizes=
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time

import psutil
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from poster_cnn.data import convert, pipeline, synthetic  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A converted dataset; default: convert "
                                "../shared/data/movie-posters into a temp dir.")
_SAMPLE = flags.DEFINE_string("sample", os.path.join(REPO, "..", "shared", "data",
                                                     "movie-posters"),
                              "Kaggle-layout folder converted when --data_dir is not given.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to time.")
_IMAGE = flags.DEFINE_integer("image", 224, "Square output size.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per setting; the median is printed.")
_MEMORY_SIZES = flags.DEFINE_list("memory_sizes", ["1000", "20000"],
                                  "Synthetic set sizes for the memory check ('' to skip).")
_MEMORY_BATCHES = flags.DEFINE_integer("memory_batches", 300, "Batches read per memory run.")
_READ_ONLY = flags.DEFINE_string("read_only", None, "Internal: read --memory_batches batches "
                                 "of this dataset with max(--workers) workers, then exit.")


class PeakRss:
  """Samples the memory of a process tree (default: this one) until stopped.

  `mb` is the peak sum of RSS over the tree, which counts shared pages (grain's
  shared-memory batches, the libraries' code) once per process that maps them;
  `pss_mb` the peak sum of PSS, which splits each shared page among its sharers
  and so adds up to what the tree really holds.
  """

  def __init__(self, root: psutil.Process | None = None, interval: float = 0.05):
    self.peak = self.peak_pss = 0
    self._root = root or psutil.Process()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

  def _run(self, interval):
    while not self._stop.is_set():
      rss = pss = 0
      try:
        tree = [self._root, *self._root.children(recursive=True)]
      except psutil.Error:
        tree = []
      for p in tree:
        try:
          info = p.memory_full_info()
          rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
          pass
      self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
      time.sleep(interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  @property
  def mb(self) -> float:
    return self.peak / 2**20

  @property
  def pss_mb(self) -> float:
    return self.peak_pss / 2**20


def read_batches(data_dir, workers, n, warmup=0) -> float:
  """Seconds to read `n` batches after `warmup` batches."""
  opts = pipeline.ImageOptions(height=_IMAGE.value, width=_IMAGE.value)
  it = iter(pipeline.train_dataset(data_dir, "train", global_batch_size=_BATCH.value,
                                   image=opts, seed=0, num_workers=workers))
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(n):
      next(it)
    return time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()


def _convert(csv_path, image_dir, out):
  convert.convert(csv_path, out, image_dir=image_dir, vocabulary="min_count:1",
                  splits="train:0.8,validation:0.1,test:0.1", num_workers=2)
  return out


def main(argv):
  del argv
  if _READ_ONLY.value:
    read_batches(_READ_ONLY.value, max(map(int, _WORKERS.value)), _MEMORY_BATCHES.value)
    return
  tmp = tempfile.mkdtemp(prefix="input_bench_")
  data_dir, name = _DATA_DIR.value, "given"
  if data_dir is None and os.path.isdir(_SAMPLE.value):
    name = "sample"
    data_dir = _convert(os.path.join(_SAMPLE.value, "MovieGenre.csv"),
                        os.path.join(_SAMPLE.value, "posters"), os.path.join(tmp, "sample"))
  if data_dir:
    from poster_cnn.data import records
    n = records.read_metadata(data_dir).splits["train"].num_examples
    for workers in map(int, _WORKERS.value):
      rates, peak, peak_pss = [], 0.0, 0.0
      for _ in range(_REPEATS.value):
        with PeakRss() as rss:
          seconds = read_batches(data_dir, workers, _BATCHES.value, _WARMUP.value)
        rates.append(_BATCHES.value * _BATCH.value / seconds)
        peak, peak_pss = max(peak, rss.mb), max(peak_pss, rss.pss_mb)
      print(f"input data={name} examples={n} workers={workers} image={_IMAGE.value} "
            f"batch={_BATCH.value} img_per_s={statistics.median(rates):.1f} "
            f"peak_rss_mb={peak:.1f} peak_pss_mb={peak_pss:.1f}", flush=True)

  for size in [int(s) for s in _MEMORY_SIZES.value if s]:
    src = os.path.join(tmp, f"synthetic{size}")
    csv_path = synthetic.generate(src, size, seed=0, num_workers=2)
    out = _convert(csv_path, os.path.join(src, "posters"), src + "_data")
    workers = max(map(int, _WORKERS.value))
    # A fresh process per size: this one has generated and converted posters, and
    # what its allocator kept from that would blur the comparison.
    child = psutil.Popen([sys.executable, os.path.abspath(__file__), f"--read_only={out}",
                          f"--workers={workers}", f"--image={_IMAGE.value}",
                          f"--batch={_BATCH.value}", f"--memory_batches={_MEMORY_BATCHES.value}"])
    with PeakRss(child) as rss:
      if child.wait():
        raise RuntimeError(f"reading {out} failed with exit code {child.returncode}")
    print(f"memory data=synthetic{size} examples={size} workers={workers} image={_IMAGE.value} "
          f"batches={_MEMORY_BATCHES.value} peak_rss_mb={rss.mb:.1f} "
          f"peak_pss_mb={rss.pss_mb:.1f}", flush=True)

if __name__ == "__main__":
  app.run(main)
