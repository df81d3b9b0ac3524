"""Where a train step's time goes: XLA op time per step, by kind of op.

Traces a few train steps with `jax.profiler` (XLA's CPU runtime emits one event per
executed op when --xla_cpu_enable_xprof_traceme is set, which this script does) and
sums the op events of the trace by kind, e.g.

  profile config=paper device=cpu batch=32 image=224 steps=3 op_ms_per_step=1081.4
  op kind=dot ms_per_step=407.5 share=0.377
  op kind=im2col ms_per_step=378.4 share=0.350
  ...

Kinds come from XLA's fusion names: 'dot' (matmuls, YNNPACK or Eigen), 'conv'
(XLA convolutions), 'im2col' (concatenate/pad/slice: building 3x3 patches and
their gradient), 'elementwise+reduce' (BatchNorm, ReLU, the optimizer update),
'select' (pooling gradients, ReLU masks), 'copy' (layout changes). Op time is
summed over threads, so it can exceed the wall time when ops overlap.

It also sums them by the part of the model each op computes, from the op's JAX name
stack in the compiled HLO's metadata (the Flax module, jax.nn.relu, or the named scope
of the max pooling), forward and backward together:

  op part=convolutions ms_per_step=... share=...
  op part=batchnorm ...  (also: pooling, relu, conv_bias, dropout, dense, loss, optimizer)

A fusion is named for its root op, so work fused across parts counts for the root's.

    python benchmarks/step_profile.py --config=configs/paper.py --batch=32 --top=15
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

# Must be set before XLA initialises.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poster_cnn import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper.py", "Model config.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps (after 2 untraced ones).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 13, "Model outputs.")
_TOP = flags.DEFINE_integer("top", 15, "Also print the N most expensive single ops.")

_KINDS = [  # (kind, pattern on the op name); first match wins
    ("dot", r"^(ynn_fusion|xnn_fusion|dot|onednn)"),
    ("conv", r"^(convolution|conv|ffi_call|custom-call)"),  # custom calls: oneDNN's convs
    ("im2col", r"^(concatenate|pad|slice|bitcast_concatenate|concatenate_bitcast)"),
    ("select", r"select"),
    ("copy", r"^(copy|transpose)"),
    ("elementwise+reduce", r"^(broadcast|multiply|add|subtract|divide|maximum|reduce|"
                           r"bitcast|exponential|log|sqrt|rsqrt|and|or|convert|negate|"
                           r"compare|fusion|loop|input|wrapped)"),
]
_PARTS = [  # (part, pattern on the op's name stack); first match wins
    ("pooling", r"max_pool"),
    ("convolutions", r"ffi_call|conv_general_dilated"),  # with bias and ReLU when fused
    ("relu", r"relu"),
    ("conv_bias", r"Conv_\d+/"),
    ("batchnorm", r"BatchNorm"),
    ("dropout", r"Dropout"),
    ("dense", r"Dense"),
    ("loss", r"log_sigmoid|softplus|PosterCNN"),  # what is left inside the model's jvp
    ("optimizer", r"."),  # Adam and the parameter update: outside the model's name stack
]
_NOT_OPS = ("$", "Thunk", "PjRt", "Execute", "Pjit", "SlinkyThreadPool", "CommonPjRt", "end:")


def op_kind(name: str) -> str:
  """The kind of an XLA op from its (fusion) name.

  E.g. 'broadcast_add_fusion' -> 'elementwise+reduce', 'ynn_fusion' -> 'dot'.
  """
  for kind, pattern in _KINDS:
    if re.search(pattern, name):
      return kind
  return "other"


def op_times(trace_dir: str) -> dict[str, float]:
  """Total microseconds per op name in the perfetto trace under `trace_dir`."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"no perfetto trace written under {trace_dir}")
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
      totals[e["name"]] += e["dur"]
  return totals


def op_parts(hlo_text: str) -> dict[str, str]:
  """Instruction name -> part of the model (`_PARTS`) from the compiled HLO's metadata."""
  parts = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"",
                       hlo_text, re.MULTILINE):
    parts[m[1]] = next(part for part, pattern in _PARTS if re.search(pattern, m[2]))
  return parts


def main(argv):
  del argv
  config = _CONFIG.value
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  mesh = train.create_mesh()
  init, _, _ = train.state_factory(config, _NUM_CLASSES.value, 1000, mesh)
  state = init()
  train_fn, _ = train.jit_steps(state, mesh)
  h, w, b = config.image.height, config.image.width, _BATCH.value
  rng = np.random.default_rng(0)
  batch = train.global_batch({
      "image": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
      "labels": (rng.random((b, _NUM_CLASSES.value)) < 0.2).astype(np.uint8),
      "mask": np.ones((b,), bool)}, mesh)
  parts = op_parts(train_fn.lower(state, batch).compile().as_text())
  for _ in range(2):  # compile and warm up outside the trace
    state, m = train_fn(state, batch)
  jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(_STEPS.value):
        state, m = train_fn(state, batch)
      jax.block_until_ready(m)
    totals = op_times(trace_dir)

  per_step = {n: t / _STEPS.value / 1e3 for n, t in totals.items()}  # ms
  total = sum(per_step.values())
  print(f"profile config={name} device={jax.devices()[0].platform} batch={b} image={h} "
        f"steps={_STEPS.value} op_ms_per_step={total:.1f}")
  kinds = collections.Counter()
  for n, ms in per_step.items():
    kinds[op_kind(re.sub(r"\.\d+$", "", n))] += ms
  for kind, ms in kinds.most_common():
    print(f"op kind={kind} ms_per_step={ms:.1f} share={ms / total:.3f}")
  by_part = collections.Counter()
  for n, ms in per_step.items():
    by_part[parts.get(n, "other")] += ms
  for part, ms in by_part.most_common():
    print(f"op part={part} ms_per_step={ms:.1f} share={ms / total:.3f}")
  for n, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    print(f"top op={n} kind={op_kind(n)} part={parts.get(n, 'other')} ms_per_step={ms:.1f}")


if __name__ == "__main__":
  app.run(main)
