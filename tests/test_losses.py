import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from poster_cnn import losses


def _batch(seed=0, b=6, k=5):
  keys = jax.random.split(jax.random.key(seed), 2)
  logits = 3 * jax.random.normal(keys[0], (b, k))
  labels = (jax.random.uniform(keys[1], (b, k)) < 0.3).astype(jnp.uint8)
  return logits, labels


def test_default_is_the_papers_mean_binary_cross_entropy():
  logits, labels = _batch()
  want = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
  got = losses.multilabel_loss(logits, labels, jnp.ones((6,), bool))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_masked_examples_do_not_count():
  logits, labels = _batch()
  mask = jnp.array([True, True, False, True, False, False])
  want = losses.multilabel_loss(logits[mask], labels[mask], jnp.ones((3,), bool))
  np.testing.assert_allclose(losses.multilabel_loss(logits, labels, mask), want, rtol=1e-6)
  assert losses.multilabel_loss(logits, labels, jnp.zeros((6,), bool)) == 0


def test_positive_weights_scale_only_the_positive_terms():
  logits, labels = _batch()
  y = labels.astype(jnp.float32)
  w = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
  want = (-(w * y * jax.nn.log_sigmoid(logits)) - (1 - y) * jax.nn.log_sigmoid(-logits)).mean()
  got = losses.multilabel_loss(logits, labels, jnp.ones((6,), bool), pos_weight=w)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_focal_loss_matches_optax():
  logits, labels = _batch(1)
  want = optax.sigmoid_focal_loss(logits, labels.astype(jnp.float32), gamma=2.0).mean()
  got = losses.multilabel_loss(logits, labels, jnp.ones((6,), bool), gamma=2.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_label_smoothing_moves_targets_towards_one_half():
  logits, labels = _batch(2)
  smoothed = labels * 0.9 + 0.05
  want = optax.sigmoid_binary_cross_entropy(logits, smoothed).mean()
  got = losses.multilabel_loss(logits, labels, jnp.ones((6,), bool), label_smoothing=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_positive_weights_from_training_frequencies():
  # 100 examples: 50, 10, 1 and 0 positives.
  w = losses.positive_weights([50, 10, 1, 0], 100, power=1.0, max_weight=50.0)
  np.testing.assert_allclose(w, [1.0, 9.0, 50.0, 50.0])
  np.testing.assert_allclose(losses.positive_weights([50, 10], 100, power=0.5), [1.0, 3.0])
  np.testing.assert_array_equal(losses.positive_weights([50, 10], 100, power=0.0), [1.0, 1.0])
  assert losses.positive_weights([90], 100, power=1.0)[0] == 1.0  # never below 1


def _loss_config(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config().loss
  c.update(overrides)
  return c


def test_create_loss_applies_the_configured_weights():
  logits, labels = _batch()
  fn = losses.create_loss(_loss_config(pos_weight_power=1.0), [3, 1, 2, 6, 3], 6)
  w = losses.positive_weights([3, 1, 2, 6, 3], 6, 1.0)
  want = losses.multilabel_loss(logits, labels, jnp.ones((6,), bool), pos_weight=jnp.asarray(w))
  np.testing.assert_allclose(fn(logits, labels, jnp.ones((6,), bool)), want, rtol=1e-6)


@pytest.mark.parametrize("field,value", [("gamma", -1.0), ("label_smoothing", 1.0),
                                         ("pos_weight_power", -0.5)])
def test_bad_loss_settings_name_the_flag(field, value):
  with pytest.raises(ValueError, match=f"--config.loss.{field}"):
    losses.create_loss(_loss_config(**{field: value}), [1, 2], 4)
