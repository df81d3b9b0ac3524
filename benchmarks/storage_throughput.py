"""Input pipeline images/s reading one converted dataset from local disk, the GCS
emulator and the S3 emulator, side by side.

Starts moto's S3 server and the GCS emulator (tests/gcs_emulator.py) on loopback
ports, uploads the dataset to both, then times --batches training batches (after
--warmup) from each store in turn, --repeats times, and prints the medians:

  storage store=local examples=1600 workers=2 image=224 batch=32 img_per_s=212.4 ratio=1.00
  storage store=gs ...

    python benchmarks/storage_throughput.py                  # 2,000 real posters, converted
    python benchmarks/storage_throughput.py --data_dir=DATA

Emulators are single Python processes on the same machine, so the figures bound
from below what a real bucket gives a pipeline (no network latency, but a slow
server); ratios to local disk are what they tell.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A converted dataset; default: convert the "
                                "first --posters rows of ../shared/data/movie-posters.")
_SAMPLE = flags.DEFINE_string("sample", os.path.join(REPO, "..", "shared", "data",
                                                     "movie-posters"), "Kaggle-layout folder.")
_POSTERS = flags.DEFINE_integer("posters", 2000, "CSV rows converted when --data_dir is unset.")
_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes.")
_IMAGE = flags.DEFINE_integer("image", 224, "Square output size.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first (start the workers).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per store; the median is printed.")
_BUCKET = "poster-cnn-bench"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(port: int) -> None:
  deadline = time.time() + 60
  while time.time() < deadline:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"no emulator on port {port}")


def start_emulators() -> list[subprocess.Popen]:
  """Starts both emulators and points this process's clients (and its workers') at them."""
  gcs, s3 = _free_port(), _free_port()
  os.environ.update({
      "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs}", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
      "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
      "AWS_EC2_METADATA_DISABLED": "true", "GCE_METADATA_HOST": "127.0.0.1:1",
      "GCE_METADATA_ROOT": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1", "NO_GCE_CHECK": "True"})
  procs = [subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                             "-H", "127.0.0.1", "-p", str(s3)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL),
           subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"),
                             "127.0.0.1", str(gcs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)]
  _wait(s3)
  _wait(gcs)
  return procs


def read_batches(data_dir: str) -> float:
  """Seconds for --batches training batches after --warmup."""
  from poster_cnn.data import pipeline
  opts = pipeline.ImageOptions(height=_IMAGE.value, width=_IMAGE.value)
  it = iter(pipeline.train_dataset(data_dir, "train", global_batch_size=_BATCH.value,
                                   image=opts, seed=0, num_workers=_WORKERS.value))
  try:
    for _ in range(_WARMUP.value):
      next(it)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    return time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()


def _subset(tmp: str) -> str:
  """The first --posters rows of the shared set, converted into `tmp`."""
  from poster_cnn.data import convert
  csv_path = os.path.join(tmp, "MovieGenre.csv")
  with open(os.path.join(_SAMPLE.value, "MovieGenre.csv"), encoding="utf-8",
            errors="replace") as f, open(csv_path, "w", encoding="utf-8") as out:
    for i, line in enumerate(f):
      if i > _POSTERS.value:
        break
      out.write(line)
  out = os.path.join(tmp, "data")
  convert.convert(csv_path, out, image_dir=os.path.join(_SAMPLE.value, "posters"),
                  vocabulary="min_count:1", splits="train:0.8,validation:0.1,test:0.1",
                  num_workers=2)
  return out


def main(argv):
  del argv
  from poster_cnn import storage
  from poster_cnn.data import records
  tmp = tempfile.mkdtemp(prefix="storage_bench_")
  local = _DATA_DIR.value or _subset(tmp)
  procs = start_emulators()
  try:
    stores = {"local": local}
    for scheme in ("gs", "s3"):
      storage.filesystem(f"{scheme}://{_BUCKET}").mkdir(f"{scheme}://{_BUCKET}",
                                                        create_parents=True)
      stores[scheme] = f"{scheme}://{_BUCKET}/data"
      storage.upload_tree(local, stores[scheme])
    n = records.read_metadata(local).splits["train"].num_examples
    rates = {name: [] for name in stores}
    for _ in range(_REPEATS.value):  # interleaved, so load changes hit every store alike
      for name, data_dir in stores.items():
        rates[name].append(_BATCHES.value * _BATCH.value / read_batches(data_dir))
    base = statistics.median(rates["local"])
    for name, r in rates.items():
      print(f"storage store={name} examples={n} workers={_WORKERS.value} image={_IMAGE.value} "
            f"batch={_BATCH.value} img_per_s={statistics.median(r):.1f} "
            f"ratio={statistics.median(r) / base:.2f} runs={','.join(f'{x:.1f}' for x in r)}",
            flush=True)
  finally:
    for p in procs:
      p.terminate()
      p.wait(timeout=30)


if __name__ == "__main__":
  app.run(main)
