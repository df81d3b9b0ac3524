"""Train step throughput of the paper model per conv formulation and allocator, interleaved.

For each batch size, every (allocator, conv impl) variant is timed in rounds that
alternate between variants, so machine load drifts hit all of them alike; each
line reports the median over rounds. Variants with the default allocator run in
this process; any other allocator (an LD_PRELOAD'ed malloc) runs each round in a
child process of this script, started in turn with the in-process rounds.

One line per (batch, allocator, impl):

  conv batch=32 alloc=tcmalloc impl=xla_wgrad_im2col rounds=3 train_step_ms=...
       train_img_per_s=... fwd_ms=... fwd_bwd_ms=... bwd_ms=... ratio_vs_base=...

train = the jitted, donated train step (forward, backward, Adam update) of
poster_cnn.train; fwd = the train-mode forward (dropout, BatchNorm statistics);
fwd_bwd = value_and_grad of the loss; bwd = fwd_bwd - fwd. ratio_vs_base
divides train img/s by that of the first variant listed (alloc=default impl=xla
unless told otherwise).

    python benchmarks/conv_impl.py --batch_sizes=32,64,128 --impls=xla,xla_wgrad_im2col \\
        --allocators=default,tcmalloc
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poster_cnn import losses, model as model_lib, onednn_conv, train  # noqa: E402

ALLOCATORS = {
    "default": None,
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",  # apt libtcmalloc-minimal4
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",  # apt libjemalloc2
}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper.py", "Model config.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32"], "Global batch sizes.")
_IMPLS = flags.DEFINE_list("impls", [i for i in model_lib.CONV_IMPLS
                                     if i != "onednn" or onednn_conv.available()],
                           f"Conv formulations, keys of {sorted(model_lib.CONV_IMPLS)}.")
_ALLOCATORS = flags.DEFINE_list("allocators", ["default"],
                                f"malloc implementations: {sorted(ALLOCATORS)} or a .so path.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds; medians are reported.")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps timed per round and variant.")
_PARTS = flags.DEFINE_bool("parts", True, "Also time forward and forward+backward.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 13, "Model outputs.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one round of these variants, print JSON.")


class _Variant:
  """One conv impl at one batch size, compiled once and timed per round."""

  def __init__(self, config, impl: str, batch_size: int):
    config = config.copy_and_resolve_references()
    config.model.conv_impl = impl
    mesh = train.create_mesh()
    init, _, _ = train.state_factory(config, _NUM_CLASSES.value, 1000, mesh)
    self.state = init()
    self.train_fn, _ = train.jit_steps(self.state, mesh)
    h, w = config.image.height, config.image.width
    rng = np.random.default_rng(0)
    self.batch = train.global_batch({
        "image": rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8),
        "labels": (rng.random((batch_size, _NUM_CLASSES.value)) < 0.2).astype(np.uint8),
        "mask": np.ones((batch_size,), bool)}, mesh)
    self.batch_size = batch_size

    def loss(params, state, batch):
      rngs = {"dropout": jax.random.key(0)}
      logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                 batch["image"], train=True, mutable=["batch_stats"], rngs=rngs)
      return losses.multilabel_loss(logits, batch["labels"], batch["mask"])

    self.fwd = jax.jit(lambda s, b: loss(s.params, s, b))
    self.fwd_bwd = jax.jit(lambda s, b: jax.value_and_grad(loss)(s.params, s, b))
    self.run_train(1)  # compile and warm up
    if _PARTS.value:
      jax.block_until_ready(self.fwd(self.state, self.batch))
      jax.block_until_ready(self.fwd_bwd(self.state, self.batch))

  def run_train(self, steps: int) -> float:
    t = time.perf_counter()
    s = self.state
    for _ in range(steps):
      s, m = self.train_fn(s, self.batch)
    jax.block_until_ready(m["loss"])
    self.state = s
    return (time.perf_counter() - t) / steps

  def _once(self, fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(self.state, self.batch))
    return time.perf_counter() - t

  def round(self) -> dict:
    out = {"train": self.run_train(_STEPS.value)}
    if _PARTS.value:
      out["fwd"] = self._once(self.fwd)
      out["fwd_bwd"] = self._once(self.fwd_bwd)
    return out


def _child_cmd(alloc: str, impls: list[str], batch_size: int) -> tuple[list[str], dict]:
  lib = ALLOCATORS.get(alloc, alloc)
  env = dict(os.environ, LD_PRELOAD=lib) if lib else dict(os.environ)
  args = [a for a in sys.argv[1:] if not a.startswith(("--child", "--batch_sizes"))]
  cmd = [sys.executable, os.path.abspath(__file__), *args,
         f"--batch_sizes={batch_size}", f"--child={','.join(impls)}"]
  return cmd, env


def _report(batch_size: int, results: dict) -> None:
  base = None
  for (alloc, impl), rounds in results.items():
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    rate = batch_size / med["train"]
    base = base or rate
    line = (f"conv batch={batch_size} alloc={alloc} impl={impl} rounds={len(rounds)} "
            f"train_step_ms={med['train'] * 1e3:.1f} train_img_per_s={rate:.1f}")
    if "fwd" in med:
      line += (f" fwd_ms={med['fwd'] * 1e3:.1f} fwd_bwd_ms={med['fwd_bwd'] * 1e3:.1f}"
               f" bwd_ms={(med['fwd_bwd'] - med['fwd']) * 1e3:.1f}")
    print(line + f" ratio_vs_base={rate / base:.3f}", flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  if _CHILD.value:  # one round per variant, in this (LD_PRELOAD'ed) process
    for bs in map(int, _BATCH_SIZES.value):
      variants = {impl: _Variant(config, impl, bs) for impl in _CHILD.value.split(",")}
      print(json.dumps({impl: v.round() for impl, v in variants.items()}), flush=True)
    return

  print(f"device={jax.devices()[0].device_kind.replace(' ', '_')} devices={jax.device_count()} "
        f"cpus={os.cpu_count()}", flush=True)
  for bs in map(int, _BATCH_SIZES.value):
    local = {impl: _Variant(config, impl, bs) for impl in _IMPLS.value} \
        if "default" in _ALLOCATORS.value else {}
    results = {(a, i): [] for a in _ALLOCATORS.value for i in _IMPLS.value}
    for _ in range(_ROUNDS.value):
      for alloc in _ALLOCATORS.value:
        if alloc == "default":
          for impl, v in local.items():
            results[(alloc, impl)].append(v.round())
        else:
          cmd, env = _child_cmd(alloc, _IMPLS.value, bs)
          out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
          for impl, r in json.loads(out.strip().splitlines()[-1]).items():
            results[(alloc, impl)].append(r)
    _report(bs, results)
    del local


if __name__ == "__main__":
  app.run(main)
