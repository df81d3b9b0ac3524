"""Time dropout masks: jax.random.bernoulli (nn.Dropout's) against poster_cnn.dropout's.

  python benchmarks/dropout_masks.py [--shape=32,112,112,16] [--rate=0.1]

Prints the median of 9 timed calls of each jitted mask, after one warm-up call. The
default shape is the paper model's first dropout at 224x224, batch 32.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from poster_cnn import dropout
from timing import median_step_seconds  # benchmarks/timing.py

_SHAPE = flags.DEFINE_list("shape", ["32", "112", "112", "16"], "Mask shape.")
_RATE = flags.DEFINE_float("rate", 0.1, "Dropout rate.")


def _median_ms(fn, key) -> float:
  def run_steps(n):
    for _ in range(n):
      jax.block_until_ready(fn(key))

  run_steps(1)  # compiles
  return 1000 * median_step_seconds(run_steps, repeats=9, steps=1)


def main(argv):
  del argv
  shape, rate = tuple(int(d) for d in _SHAPE.value), _RATE.value
  masks = {
      "bernoulli": lambda k: jax.random.bernoulli(k, 1 - rate, shape),
      "jax_bits_uint16": lambda k: (jax.random.bits(k, shape, jnp.uint16)
                                    < dropout.keep_threshold(rate)),
      "poster_cnn_dropout": lambda k: dropout.keep_mask(k, shape, rate),
  }
  for name, fn in masks.items():
    print(f"mask={name} shape={'x'.join(map(str, shape))} rate={rate} "
          f"ms={_median_ms(jax.jit(fn), jax.random.key(0)):.1f}")


if __name__ == "__main__":
  app.run(main)
