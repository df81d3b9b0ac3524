"""Forward + backward time of EfficientNet-Lite0's depthwise convolutions, per formulation.

    .venv/bin/python benchmarks/depthwise_conv.py --batch=32 --height=192 --width=128

For each distinct depthwise layer shape of the network at that input size (first block of
each stage: the stride-2 ones and the widest stride-1 ones), times the jitted value and
gradient (input and kernel) of sum(conv(x, w) ** 2) with each of
poster_cnn.efficientnet.DEPTHWISE_IMPLS, medians over --repeats windows:

  depthwise hw=96x64 c=96 k=3 s=2 batch=32 impl=xla ms=32825.2
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poster_cnn import efficientnet  # noqa: E402
from timing import median_step_seconds  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_HEIGHT = flags.DEFINE_integer("height", 192, "Input image height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Input image width.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows; the median is reported.")
_IMPLS = flags.DEFINE_list("impls", list(efficientnet.DEPTHWISE_IMPLS), "Formulations.")


def layers(height: int, width: int):
  """(h, w, channels, kernel, stride) of each stage's first depthwise convolution."""
  h, w, cin = -(-height // 2), -(-width // 2), 32  # after the stem
  for stage in efficientnet.LITE0_STAGES:
    yield h, w, cin * stage.expand, stage.kernel, stage.stride
    h, w, cin = -(-h // stage.stride), -(-w // stage.stride), stage.features


def main(argv):
  del argv
  for h, w, c, k, s in layers(_HEIGHT.value, _WIDTH.value):
    x = jax.random.normal(jax.random.key(0), (_BATCH.value, h, w, c))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, c))
    for impl in _IMPLS.value:
      f = efficientnet.DEPTHWISE_IMPLS[impl]
      step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w, s) ** 2), argnums=(0, 1)))
      jax.block_until_ready(step(x, kernel))
      seconds = median_step_seconds(
          lambda n: [jax.block_until_ready(step(x, kernel)) for _ in range(n)], _REPEATS.value, 1)
      print(f"depthwise hw={h}x{w} c={c} k={k} s={s} batch={_BATCH.value} impl={impl} "
            f"ms={seconds * 1e3:.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
