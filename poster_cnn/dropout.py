"""Dropout whose random draws cost a quarter of flax's: four 16-bit draws per hash.

`nn.Dropout` draws one float32 uniform per element (`jax.random.bernoulli`), and jax's
partitionable threefry spends a whole Threefry-2x32 hash (64 random bits) on each 32-bit
draw. On a CPU that hashing is most of dropout's cost: 10-12% of the paper CNN's train
step at 224x224, whose first dropout covers 32x112x112x16 activations. Here each hash's
64 bits make four 16-bit draws, so a mask costs a quarter of the hashes.

The price is resolution: an element is kept when its draw is below
`round((1 - rate) * 2**16)`, so the keep probability is a multiple of 2**-16 (for the
paper's rate 0.1: 58,982 / 65,536 = 0.899994 instead of 0.9), and kept elements are
scaled by the inverse of that probability, so the layer stays unbiased.

The hash counters are each element's position in the global array, as in jax's
partitionable threefry: the mask of an element depends on the key and its position
only, the same on one device or a mesh, and XLA splits the hashing with the batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

_LEVELS = 1 << 16  # 16-bit draws


def keep_threshold(rate: float) -> int:
  """Draws below this (of 2**16) are kept: round((1 - rate) * 2**16)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
  return round((1.0 - rate) * _LEVELS)


def keep_mask(key: jax.Array, shape: Sequence[int], rate: float) -> jax.Array:
  """bool `shape`: True where an element is kept, each with probability
  keep_threshold(rate) / 2**16, independently.

  `key` is any jax PRNG key; its stream is reduced to one Threefry key pair first.
  """
  shape = tuple(int(d) for d in shape)
  threshold = keep_threshold(rate)
  if threshold == _LEVELS:  # rate < 2**-17: every draw (< 2**16) is kept
    return jnp.ones(shape, bool)
  if not shape:
    return keep_mask(key, (1,), rate)[0]
  groups = -(-shape[-1] // 4)  # four draws per hash along the last axis
  hashed = (*shape[:-1], groups)
  if math.prod(hashed) >= 1 << 32:
    raise ValueError(f"dropout mask of shape {shape} needs more than 2**32 hashes")
  # Each hash's counter: its row-major position among the hashes.
  position = jnp.zeros(hashed, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(hashed))):
    position = position + lax.broadcasted_iota(jnp.uint32, hashed, axis) * jnp.uint32(stride)
    stride *= hashed[axis]
  k1, k2 = jax.random.bits(key, (2,), jnp.uint32)
  bits = threefry2x32_p.bind(k1, k2, jnp.zeros_like(position), position)
  # (..., groups, 2) uint32 -> (..., groups, 2, 2) uint16 -> four draws per hash
  draws = lax.bitcast_convert_type(jnp.stack(bits, axis=-1), jnp.uint16)
  draws = draws.reshape(*shape[:-1], groups * 4)[..., :shape[-1]]
  return draws < jnp.uint16(threshold)


class Dropout(nn.Module):
  """nn.Dropout's interface (rate, broadcast_dims, deterministic, rng_collection) on
  `keep_mask`: zeroes elements with probability ~`rate` in training, scales the rest."""

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """inputs: any shape and float dtype -> the same shape and dtype."""
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    threshold = keep_threshold(self.rate)
    if threshold == 0:
      return jnp.zeros_like(inputs)
    shape = list(inputs.shape)
    for axis in self.broadcast_dims:
      shape[axis] = 1
    keep = keep_mask(self.make_rng(self.rng_collection), shape, self.rate)
    keep = jnp.broadcast_to(keep, inputs.shape)
    scale = jnp.asarray(_LEVELS / threshold, inputs.dtype)
    return lax.select(keep, inputs * scale, jnp.zeros_like(inputs))
