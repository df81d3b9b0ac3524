"""Converter throughput, peak memory and output size, on the real posters and a synthetic set.

Prints one machine-readable line per conversion, e.g.

  convert source=posters posters=13419 converted=13419 workers=2 image_size=none
          image_format=jpeg seconds=6.10 posters_per_s=2125.7 output_mb=151.2
          peak_rss_mb=412.3 max_process_rss_mb=160.2

Each conversion runs in a fresh Python process, so its memory figures are its own:
peak_rss_mb is the largest sum of RSS over that process and its image workers, sampled
every 50 ms (psutil; shared pages count once per process, so it errs high), or, without
psutil, RUSAGE_SELF + RUSAGE_CHILDREN maxrss (the main process' peak plus the largest
worker's). max_process_rss_mb is the largest single process' peak (getrusage). Memory
should not grow with the number of posters: compare the real posters' line with the
synthetic set's. output_mb is the dataset's size on disk: the price of the layouts
that store posters at the training size, or as raw pixels (--image_formats=raw).

    python benchmarks/convert_throughput.py                       # real posters + 20K synthetic
    python benchmarks/convert_throughput.py --synthetic=0 --workers=1,2 --image_sizes=none,224x224
    python benchmarks/convert_throughput.py --synthetic=0 --image_sizes=224x224 \
        --image_formats=jpeg,raw
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SAMPLE_CSV = os.path.join(REPO, "..", "shared", "data", "movie-posters", "MovieGenre.csv")

_CSV = flags.DEFINE_string("csv", SAMPLE_CSV if os.path.exists(SAMPLE_CSV) else None,
                           "A CSV to convert (default: the shared 13,419 real posters).")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None,
                                 "Its posters (default: found by the converter).")
_SYNTHETIC = flags.DEFINE_integer("synthetic", 20000, "Synthetic posters to generate; 0: none.")
_SYNTHETIC_WIDTH = flags.DEFINE_integer("synthetic_width", 182, "Width of synthetic posters.")
_WORKERS = flags.DEFINE_list("workers", [str(len(os.sched_getaffinity(0)))],
                             "--num_workers values.")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["none"], "--image_size values.")
_IMAGE_FORMATS = flags.DEFINE_list("image_formats", ["jpeg"], "--image_format values (raw "
                                   "only with an image size).")
_VOCABULARY = flags.DEFINE_string("vocabulary", "min_count:1",
                                  "Vocabulary (min_count:1 keeps every labelled row).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Scratch space (default: a temp dir, removed).")
_CHILD = flags.DEFINE_string("child", None, "Internal: convert() arguments as JSON, measured here.")


class TreeRss:
  """Samples the summed RSS of this process and its descendants in a thread."""

  def __init__(self, every: float = 0.05):
    import psutil
    self._proc, self._every, self.peak = psutil.Process(), every, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self) -> int:
    total = 0
    for p in [self._proc, *self._proc.children(recursive=True)]:
      try:
        total += p.memory_info().rss
      except Exception:  # a worker may exit between listing and reading
        pass
    return total

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._sample())
      self._stop.wait(self._every)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def measure(kwargs: dict) -> dict:
  """Runs convert(**kwargs) here; its time and memory (MB)."""
  from poster_cnn.data import convert
  try:
    sampler = TreeRss()
  except ImportError:
    sampler = None
  start = time.perf_counter()
  if sampler:
    with sampler:
      report = convert.convert(**kwargs)
  else:
    report = convert.convert(**kwargs)
  seconds = time.perf_counter() - start
  out = kwargs["output_dir"]
  output_mb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
  self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
  child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return {"rows": report["summary"]["rows"], "converted": report["summary"]["converted"],
          "skipped": report["summary"]["skipped"], "seconds": seconds, "output_mb": output_mb,
          "peak_rss_mb": sampler.peak / 2**20 if sampler else self_mb + child_mb,
          "rss_method": "psutil_tree" if sampler else "getrusage",
          "max_process_rss_mb": max(self_mb, child_mb)}


def run_one(source: str, csv_path: str, image_dir: str | None, workers: int, image_size: str,
            out: str, image_format: str = "jpeg") -> None:
  """Converts in a fresh process and prints the result line."""
  kwargs = dict(csv_path=csv_path, output_dir=out, image_dir=image_dir, num_workers=workers,
                image_size=image_size, image_format=image_format,
                vocabulary=_VOCABULARY.value, overwrite=True, max_skipped_fraction=1.0)
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--child={json.dumps(kwargs)}"],
      capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    print(f"convert source={source} failed rc={proc.returncode}\n{proc.stderr[-2000:]}",
          flush=True)
    return
  m = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"convert source={source} posters={m['rows']} converted={m['converted']} "
        f"skipped={m['skipped']} workers={workers} image_size={image_size} "
        f"image_format={image_format} seconds={m['seconds']:.2f} "
        f"posters_per_s={m['converted'] / m['seconds']:.1f} output_mb={m['output_mb']:.1f} "
        f"peak_rss_mb={m['peak_rss_mb']:.1f} max_process_rss_mb={m['max_process_rss_mb']:.1f} "
        f"rss_method={m['rss_method']}", flush=True)
  shutil.rmtree(out, ignore_errors=True)


def synthetic_csv(work_dir: str, n: int) -> str | None:
  """Generates n synthetic posters; the CSV's path, or None if the generator is missing."""
  try:
    from poster_cnn.data import synthetic
  except ImportError as e:
    print(f"# synthetic skipped: {e}", flush=True)
    return None
  directory = os.path.join(work_dir, f"synthetic_{n}")
  start = time.perf_counter()
  synthetic.generate(directory, n, seed=0, width=_SYNTHETIC_WIDTH.value)
  print(f"# generated {n} synthetic posters in {time.perf_counter() - start:.1f}s", flush=True)
  return os.path.join(directory, "MovieGenre.csv")


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(measure(json.loads(_CHILD.value))))
    return
  work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="convert_bench_")
  try:
    sources = []
    if _CSV.value:
      sources.append(("posters" if _CSV.value == SAMPLE_CSV else "csv", _CSV.value,
                      _IMAGE_DIR.value))
    if _SYNTHETIC.value:
      path = synthetic_csv(work_dir, _SYNTHETIC.value)
      if path:
        sources.append((f"synthetic_{_SYNTHETIC.value}", path, None))
    print(f"# cpus={len(os.sched_getaffinity(0))}", flush=True)
    for source, csv_path, image_dir in sources:
      for workers in map(int, _WORKERS.value):
        for image_size in _IMAGE_SIZES.value:
          for image_format in _IMAGE_FORMATS.value:
            if image_format == "raw" and image_size.lower() in ("", "none"):
              continue  # raw pixels need one size
            run_one(source, csv_path, image_dir, workers, image_size,
                    os.path.join(work_dir, "out"), image_format)
  finally:
    if not _WORK_DIR.value:
      shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
