"""Input pipeline throughput and memory, side by side with tf.data in one run.

Prints machine-readable lines, e.g.

  input data=raw224 examples=2000 workers=1 device=0 aug=none img_per_s=7012.3
        img_per_s_max=7400.1 per_process=7012.3 peak_rss_mb=410.2 peak_pss_mb=350.1
  tfdata data=pass examples=2000 img_per_s=1576.2 img_per_s_max=2950.3 peak_rss_mb=...
  ratio data=raw224 workers=1 device=0 to_tfdata_max=2.38 to_tfdata_median=4.45

Each `input` setting (a converted dataset, a number of grain worker processes, host
only or host plus device preprocessing) runs in a fresh process that reads --epochs
whole epochs of training batches (shuffled, sharded, batched as training reads them,
then made global arrays with `jax.make_array_from_process_local_data` and waited for;
with `device=1` also resized and augmented by `poster_cnn.preprocess.prepare` under
jit, as the train step does, overlapped with the next batch's reading). The figure is
the median of its epochs' images/s (and the fastest epoch); the first batches, which
start the workers and compile, are read before the clock starts. `per_process` divides
by the worker processes (by the CPUs for 0 workers, whose threads use them all), and
`img_per_cpu_s` divides the images by the CPU time the reader's process tree spent on
them (tf.data: its process): the rate one core sustains, which a shared, loaded
machine distorts far less than wall-clock rates, and from which a many-core host's
figure can be read off as long as the main process keeps up. The tf.data reference (benchmarks/tfdata_reference.py,
run with --tf_python, a Python that has TensorFlow) runs its epochs in the same rounds,
interleaved with ours, so that load on a shared machine hits both alike.

Memory is sampled over each process tree (the reader and its workers) every 50 ms, as
summed RSS (shared pages once per process that maps them) and summed PSS (shared pages
split among sharers: what the tree really holds). `--memory_dirs` reads the same
number of batches from datasets of different sizes: flat memory means equal peaks.

    python benchmarks/input_throughput.py --data_dirs=pass=/tmp/d_pass,raw224=/tmp/d_raw \\
        --workers=0,1,2 --tf_python=/tmp/tfvenv/bin/python --tf_data=pass
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_DATA_DIRS = flags.DEFINE_list("data_dirs", None, "NAME=DIR of converted datasets to read.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to time.")
_DEVICE = flags.DEFINE_list("device", ["0"], "0: host only; 1: plus device preprocessing.")
_AUGMENT = flags.DEFINE_enum("augment", "none", ["none", "crop_flip", "crop_flip_jitter"],
                             "Augmentation (device=1 only; the host work is the same).")
_IMAGE = flags.DEFINE_integer("image", 224, "Square model input size.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs per setting and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds over every setting, interleaved.")
_TF_PYTHON = flags.DEFINE_string("tf_python", None, "A Python with TensorFlow: also run "
                                 "benchmarks/tfdata_reference.py in every round.")
_TF_DATA = flags.DEFINE_list("tf_data", None, "Names of --data_dirs tf.data reads "
                             "(default: the first).")
_MEMORY_DIRS = flags.DEFINE_list("memory_dirs", [], "NAME=DIR datasets of different sizes "
                                 "to read --memory_batches batches from, for peak memory.")
_MEMORY_BATCHES = flags.DEFINE_integer("memory_batches", 300, "Batches per memory run.")
_CHILD = flags.DEFINE_string("child", None, "Internal: one setting as JSON, run here.")


class PeakRss:
  """Samples the memory of a process tree (default: this one) until stopped: peak summed
  RSS (`mb`) and peak summed PSS (`pss_mb`)."""

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
      self._stop.wait(interval)

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


def _options(augment: str, image: int):
  from poster_cnn.data import pipeline
  return pipeline.ImageOptions(height=image, width=image,
                               random_crop=augment != "none", horizontal_flip=augment != "none",
                               color_jitter=0.2 if augment == "crop_flip_jitter" else 0.0)


def run_child(setting: dict) -> dict:
  """Reads the setting's epochs here; seconds per epoch."""
  import jax
  from poster_cnn import preprocess, train
  from poster_cnn.data import pipeline, records
  opts = _options(setting["augment"], setting["image"])
  data_dir, batch = setting["data_dir"], setting["batch"]
  n = records.read_metadata(data_dir).splits["train"].num_examples
  per_epoch = setting.get("batches") or n // batch
  mesh = train.create_mesh()
  prepare = jax.jit(lambda images, step: preprocess.prepare(
      images, opts, jax.random.fold_in(jax.random.key(0), step)))
  it = iter(pipeline.train_dataset(data_dir, "train", global_batch_size=batch, image=opts,
                                   seed=0, num_workers=setting["workers"]))
  step, pending = 0, None

  def one():
    nonlocal step, pending
    images = train.global_batch(next(it), mesh)["image"]
    if setting["device"]:
      out = prepare(images, step)  # asynchronous: overlaps the next batch's reading
      if pending is not None:
        pending.block_until_ready()
      pending = out
    else:
      images.block_until_ready()
    step += 1

  try:
    for _ in range(3):  # workers started, preprocessing compiled
      one()
    seconds, cpu = [], []
    for _ in range(setting["epochs"]):
      start, start_cpu = time.perf_counter(), _tree_cpu_seconds()
      for _ in range(per_epoch):
        one()
      if pending is not None:
        pending.block_until_ready()
      seconds.append(time.perf_counter() - start)
      cpu.append(_tree_cpu_seconds() - start_cpu)
  finally:
    it.close()
  return {"examples": n, "images": per_epoch * batch, "seconds": seconds, "cpu": cpu}


def _tree_cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live descendants (grain's workers)."""
  total = 0.0
  me = psutil.Process()
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def _measure(cmd: list[str]) -> tuple[str, PeakRss]:
  child = psutil.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
  with PeakRss(child) as rss:
    out, _ = child.communicate()
  if child.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed with exit code {child.returncode}")
  return out, rss


def run_ours(setting: dict) -> tuple[dict, PeakRss]:
  out, rss = _measure([sys.executable, os.path.abspath(__file__),
                       f"--child={json.dumps(setting)}"])
  return json.loads(out.strip().splitlines()[-1]), rss


def run_tfdata(data_dir: str) -> tuple[list[float], int, PeakRss]:
  out, rss = _measure([_TF_PYTHON.value, os.path.join(REPO, "benchmarks", "tfdata_reference.py"),
                       f"--data_dir={data_dir}", f"--epochs={_EPOCHS.value + 1}",
                       f"--image={_IMAGE.value}", f"--batch={_BATCH.value}"])
  rates, per_cpu, n = [], [], 0
  for line in out.splitlines():
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    if line.startswith("epoch ") and fields["epoch"] != "0":  # epoch 0 traces the graph
      rates.append(float(fields["img_per_s"]))
      per_cpu.append(int(fields["images"]) / float(fields["cpu_s"]))
    elif line.startswith("tfdata "):
      n = int(fields["examples"])
  return rates, per_cpu, n, rss


def _named(items: list[str]) -> dict[str, str]:
  out = {}
  for item in items:
    name, _, path = item.partition("=")
    out[name if path else os.path.basename(item.rstrip("/"))] = path or name
  return out


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(run_child(json.loads(_CHILD.value))), flush=True)
    return
  cpus = len(os.sched_getaffinity(0))
  print(f"# cpus={cpus} batch={_BATCH.value} image={_IMAGE.value} epochs={_EPOCHS.value} "
        f"rounds={_ROUNDS.value} augment={_AUGMENT.value}", flush=True)
  dirs = _named(_DATA_DIRS.value or [])
  tf_names = _TF_DATA.value or list(dirs)[:1]
  settings = [dict(name=name, data_dir=path, workers=int(w), device=int(d),
                   augment=_AUGMENT.value if int(d) else "none", image=_IMAGE.value,
                   batch=_BATCH.value, epochs=_EPOCHS.value)
              for name, path in dirs.items() for w in _WORKERS.value for d in _DEVICE.value]
  results = {json.dumps(s, sort_keys=True): ([], [], 0, 0.0, 0.0) for s in settings}
  tf_results = {name: ([], [], 0, 0.0, 0.0) for name in tf_names}
  for _ in range(_ROUNDS.value):
    if _TF_PYTHON.value:
      for name in tf_names:
        rates, per_cpu, n, rss = run_tfdata(dirs[name])
        old = tf_results[name]
        tf_results[name] = (old[0] + rates, old[1] + per_cpu, n, max(old[3], rss.mb),
                            max(old[4], rss.pss_mb))
    for s in settings:
      out, rss = run_ours(s)
      key = json.dumps(s, sort_keys=True)
      old = results[key]
      rates = [out["images"] / t for t in out["seconds"]]
      per_cpu = [out["images"] / t for t in out["cpu"]]
      results[key] = (old[0] + rates, old[1] + per_cpu, out["examples"], max(old[3], rss.mb),
                      max(old[4], rss.pss_mb))

  for name, (rates, per_cpu, n, rss, pss) in tf_results.items():
    if rates:
      print(f"tfdata data={name} examples={n} epochs={len(rates)} "
            f"img_per_s={statistics.median(rates):.1f} img_per_s_max={max(rates):.1f} "
            f"img_per_cpu_s={statistics.median(per_cpu):.1f} "
            f"peak_rss_mb={rss:.1f} peak_pss_mb={pss:.1f}", flush=True)
  tf_best = max((max(r[0]) for r in tf_results.values() if r[0]), default=None)
  tf_median = max((statistics.median(r[0]) for r in tf_results.values() if r[0]),
                  default=None)
  for s in settings:
    rates, per_cpu, n, rss, pss = results[json.dumps(s, sort_keys=True)]
    rate = statistics.median(rates)
    per_process = rate / (s["workers"] or cpus)
    print(f"input data={s['name']} examples={n} workers={s['workers']} device={s['device']} "
          f"aug={s['augment']} epochs={len(rates)} img_per_s={rate:.1f} "
          f"img_per_s_max={max(rates):.1f} per_process={per_process:.1f} "
          f"img_per_cpu_s={statistics.median(per_cpu):.1f} "
          f"peak_rss_mb={rss:.1f} peak_pss_mb={pss:.1f}", flush=True)
    if tf_best:
      print(f"ratio data={s['name']} workers={s['workers']} device={s['device']} "
            f"to_tfdata_max={rate / tf_best:.2f} to_tfdata_median={rate / tf_median:.2f}",
            flush=True)

  for name, path in _named(_MEMORY_DIRS.value).items():
    for w in map(int, _WORKERS.value):
      s = dict(data_dir=path, workers=w, device=0, augment="none", image=_IMAGE.value,
               batch=_BATCH.value, epochs=1, batches=_MEMORY_BATCHES.value)
      out, rss = run_ours(s)
      print(f"memory data={name} examples={out['examples']} workers={w} "
            f"batches={_MEMORY_BATCHES.value} img_per_s={out['images'] / out['seconds'][0]:.1f} "
            f"peak_rss_mb={rss.mb:.1f} peak_pss_mb={rss.pss_mb:.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
