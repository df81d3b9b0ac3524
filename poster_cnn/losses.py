"""Multi-label losses over sigmoid outputs.

The paper's loss is plain binary cross-entropy. On posters most genres are rare
(a few percent positives), so the options here re-weight the rare positives
(`pos_weight_power`), down-weight easy examples (focal `gamma`) or soften the
targets (`label_smoothing`); with their defaults the loss is the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def positive_weights(positives: Sequence[int], num_examples: int, power: float,
                     max_weight: float = 50.0) -> np.ndarray:
  """Per-genre weight of positive terms: ((N - P) / P) ** power, clipped to [1, max_weight].

  power 0: all ones (plain BCE); 1: positives and negatives of each genre weigh the
  same in total; 0.5: in between. A genre without training positives gets max_weight
  (it has no positive terms to weight, so the value is moot).
  Returns float32 (K,).
  """
  p = np.asarray(positives, np.float64)
  ratio = np.where(p > 0, (num_examples - p) / np.maximum(p, 1), max_weight)
  return np.clip(ratio ** power, 1.0, max_weight).astype(np.float32)


def multilabel_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                    pos_weight: jax.Array | None = None, gamma: float = 0.0,
                    label_smoothing: float = 0.0) -> jax.Array:
  """Mean over genres and unmasked examples of the (weighted, focal) binary cross-entropy.

  logits float32 (B, K); labels uint8 or float (B, K) in [0, 1] (soft after mixup);
  mask bool (B,);
  pos_weight float32 (K,) multiplies the positive term of each genre.
  Returns a float32 scalar. With the defaults it is optax's sigmoid BCE, averaged.
  """
  logits = logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  if label_smoothing:
    y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  pos, neg = -y * log_p, -(1.0 - y) * log_not_p
  if gamma:
    # Focal modulation: (1 - p_t)^gamma, with p the probability of each term's target.
    pos = pos * (-jnp.expm1(log_p)) ** gamma
    neg = neg * (-jnp.expm1(log_not_p)) ** gamma
  if pos_weight is not None:
    pos = pos * pos_weight
  per_example = (pos + neg).mean(-1)
  weight = mask.astype(jnp.float32)
  return (per_example * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def create_loss(config, positives: Sequence[int], num_examples: int) -> LossFn:
  """The loss a config's `loss` section describes; `positives` per genre in the train split."""
  c = config
  if c.gamma < 0:
    raise ValueError(f"--config.loss.gamma must be >= 0, not {c.gamma}")
  if not 0 <= c.label_smoothing < 1:
    raise ValueError(f"--config.loss.label_smoothing must be in [0, 1), not {c.label_smoothing}")
  if c.pos_weight_power < 0:
    raise ValueError(f"--config.loss.pos_weight_power must be >= 0, not {c.pos_weight_power}")
  weights = None
  if c.pos_weight_power:
    weights = jnp.asarray(positive_weights(positives, num_examples, c.pos_weight_power,
                                           c.max_pos_weight))

  def loss(logits, labels, mask):
    return multilabel_loss(logits, labels, mask, pos_weight=weights, gamma=c.gamma,
                           label_smoothing=c.label_smoothing)

  return loss
