"""mixup (Zhang et al., 2018) for multi-label batches, on the device inside the train step.

Each example is blended with another example of the same global batch, images and
label vectors alike, with its own weight lambda ~ Beta(alpha, alpha): a regulariser
for small poster sets, where the models here start to overfit after a few epochs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, mask: jax.Array,
          alpha: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Blends example i with example perm[i] of the batch, perm a random permutation.

  Args:
    rng: a JAX key.
    images: uint8 or float (B, H, W, C) in [0, 255].
    labels: uint8 or float (B, K) in [0, 1].
    mask: bool (B,); a blend counts only if both of its examples do.
    alpha: > 0, the Beta distribution's parameters (small: mostly near-originals).

  Returns:
    (images float32 (B, H, W, C) in [0, 255], labels float32 (B, K) in [0, 1], mask bool (B,)).
  """
  lam_rng, perm_rng = jax.random.split(rng)
  batch = images.shape[0]
  lam = jax.random.beta(lam_rng, alpha, alpha, (batch,), jnp.float32)
  perm = jax.random.permutation(perm_rng, batch)

  def blend(x):
    x = x.astype(jnp.float32)
    w = lam.reshape((batch,) + (1,) * (x.ndim - 1))
    return w * x + (1.0 - w) * x[perm]

  return blend(images), blend(labels), mask & mask[perm]
