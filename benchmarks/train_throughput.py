"""Train and eval step throughput of a config's model on random uint8 batches.

Prints one machine-readable line per (mode, batch size), e.g.

  train config=paper device=cpu devices=1 batch=32 image=224 compile_s=3.1
        step_ms=1290.2 img_per_s=24.8 gflop_per_img=1.19 mfu=0.074 peak_rss_mb=1710

Step times are medians over --repeats timed windows of --steps steps each,
after one warm-up step that includes compilation. MFU divides the achieved
model FLOP rate (XLA's cost analysis of the step with XLA convolutions, before
backend optimisation) by --peak_gflops, a matmul rate in the config's compute
dtype measured on the same device when not given.

    python benchmarks/train_throughput.py --config=configs/paper.py --batch_sizes=32,64,128
"""

from __future__ import annotations

import copy
import os
import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poster_cnn import train  # noqa: E402
from timing import median_step_seconds  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper.py", "Model config.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows; the median is reported.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 13, "Model outputs.")
_PEAK = flags.DEFINE_float("peak_gflops", 0.0, "Peak GFLOP/s for MFU; 0 = measure a matmul.")
_EVAL = flags.DEFINE_bool("eval", True, "Also time the eval step.")


def matmul_peak_gflops(dtype: str = "float32", repeats: int = 5) -> float:
  """Square matmul rate of the default device in `dtype`, GFLOP/s (median).

  2048 is large enough to saturate a CPU; an accelerator needs 8192 to approach its peak.
  """
  n = 2048 if jax.devices()[0].platform == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  seconds = median_step_seconds(lambda k: [f(a).block_until_ready() for _ in range(k)],
                                repeats, 1)
  return 2 * n**3 / seconds / 1e9


def _model_flops(config, mesh, batch) -> float:
  """FLOPs of one train step on `batch`: XLA's cost analysis of the step's HLO before backend
  optimisation, with the convolutions as XLA convolutions.

  The same count on every backend and for every `conv_impl`; counting the compiled step
  would not be (custom calls such as the oneDNN convolutions, and cuDNN's on GPU, count as
  zero; im2col adds the patch matmuls' padding).
  """
  config = copy.deepcopy(config)
  config.model.conv_impl = "xla"
  init, _, _ = train.state_factory(config, _NUM_CLASSES.value, 1000, mesh)
  state = init()
  train_fn, _ = train.jit_steps(state, mesh)
  cost = train_fn.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _memory() -> str:
  """Peak memory so far: the process's resident set and, where the device reports it, the
  device's allocations (both are peaks over the whole run, so they grow with batch size)."""
  fields = [f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"]
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    fields.append(f"device_peak_mb={stats['peak_bytes_in_use'] / 2**20:.0f}")
  return " ".join(fields)


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = train.create_mesh()
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  peak = _PEAK.value or matmul_peak_gflops(config.dtype)
  device = f"device={jax.devices()[0].device_kind.replace(' ', '_')} devices={jax.device_count()}"
  print(f"peak_matmul_gflops={peak:.1f} dtype={config.dtype} {device}", flush=True)
  for batch_size in map(int, _BATCH_SIZES.value):
    init, _, _ = train.state_factory(config, _NUM_CLASSES.value, 1000, mesh)
    state = init()
    train_fn, eval_fn = train.jit_steps(state, mesh)
    h, w = config.image.height, config.image.width
    rng = np.random.default_rng(0)
    batch = train.global_batch({
        "image": rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8),
        "labels": (rng.random((batch_size, _NUM_CLASSES.value)) < 0.2).astype(np.uint8),
        "mask": np.ones((batch_size,), bool)}, mesh)

    t = time.perf_counter()
    train_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    flops_per_img = _model_flops(config, mesh, batch) / batch_size

    def run_train(n, state=[state]):  # the list carries the donated state across calls
      s = state[0]
      for _ in range(n):
        s, m = train_fn(s, batch)
      jax.block_until_ready(m["loss"])
      state[0] = s

    run_train(1)
    step = median_step_seconds(run_train, _REPEATS.value, _STEPS.value)
    rate = batch_size / step
    mfu = rate * flops_per_img / (peak * 1e9)
    print(f"train config={name} {device} batch={batch_size} image={h} compile_s={compile_s:.2f} "
          f"step_ms={step * 1e3:.1f} img_per_s={rate:.1f} gflop_per_img={flops_per_img / 1e9:.3f} "
          f"mfu={mfu:.3f} {_memory()}", flush=True)

    if _EVAL.value:
      st = run_train.__defaults__[0][0].inference_variables()
      eval_fn(st, batch).block_until_ready()

      def run_eval(n):
        for _ in range(n):
          out = eval_fn(st, batch)
        out.block_until_ready()

      step = median_step_seconds(run_eval, _REPEATS.value, _STEPS.value)
      print(f"eval config={name} {device} batch={batch_size} image={h} "
            f"step_ms={step * 1e3:.1f} img_per_s={batch_size / step:.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
