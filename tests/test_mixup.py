import jax
import jax.numpy as jnp
import numpy as np

from poster_cnn import mixup


def test_each_example_is_blended_with_one_partner_images_and_labels_alike():
  b = 6
  # Example i: every pixel 10 * i, label one-hot at i, so the outputs reveal lambda and
  # the partner.
  images = jnp.broadcast_to(10 * jnp.arange(b, dtype=jnp.uint8)[:, None, None, None],
                            (b, 4, 4, 3))
  labels = jnp.eye(b, dtype=jnp.uint8)
  mask = jnp.array([True, True, True, True, False, True])
  out_images, out_labels, out_mask = mixup.mixup(jax.random.key(0), images, labels, mask, 0.4)
  assert out_images.dtype == jnp.float32 and out_labels.dtype == jnp.float32
  out_labels = np.asarray(out_labels)
  np.testing.assert_allclose(out_labels.sum(1), 1.0, rtol=1e-6)
  partners = []
  for i in range(b):
    lam = out_labels[i, i] if np.count_nonzero(out_labels[i]) > 1 else 1.0
    others = [j for j in np.flatnonzero(out_labels[i]) if j != i]
    j = others[0] if others else i
    partners.append(j)
    if j != i:
      np.testing.assert_allclose(out_labels[i, j], 1 - lam, rtol=1e-5)
    np.testing.assert_allclose(out_images[i], 10 * (lam * i + (1 - lam) * j), rtol=1e-5)
    assert bool(out_mask[i]) == bool(mask[i] and mask[j])
  assert sorted(partners) == list(range(b))  # a permutation


def test_small_alpha_keeps_most_examples_close_to_themselves():
  labels = jnp.eye(256, dtype=jnp.float32)
  images = jnp.zeros((256, 1, 1, 1), jnp.uint8)
  _, out, _ = mixup.mixup(jax.random.key(1), images, labels, jnp.ones(256, bool), 0.1)
  own = np.diag(np.asarray(out))
  # Beta(0.1, 0.1) puts most of its mass near 0 and 1.
  assert np.mean((own < 0.1) | (own > 0.9)) > 0.6
