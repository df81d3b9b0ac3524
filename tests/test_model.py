import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from poster_cnn import model as model_lib


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def test_paper_model_has_the_papers_parameter_count():
  m = model_lib.create_model(default.get_config(), num_classes=13)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3), jnp.uint8),
                                         train=False))
  assert _count(shapes["params"]) == 3_328_013
  # BatchNorm after each of 4 convs and 2 dense layers: mean and var each.
  assert _count(shapes["batch_stats"]) == 2 * (16 + 32 + 64 + 128 + 128 + 128)


def _tiny_model():
  return model_lib.PosterCNN(num_classes=3, conv_features=(4, 4, 8, 8), dense_features=(8, 8))


def test_batchnorm_statistics_update_in_train_mode_only():
  m = _tiny_model()
  x = jax.random.randint(jax.random.key(1), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  variables = m.init(jax.random.key(0), x, train=False)
  logits, updates = m.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(2)})
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Eval mode: running averages are used and nothing is mutable.
  out1 = m.apply(variables, x, train=False)
  out2 = m.apply(variables, x, train=False)
  np.testing.assert_array_equal(out1, out2)


def test_dropout_is_active_in_train_mode_only():
  m = _tiny_model()
  x = jnp.full((2, 32, 32, 3), 128, jnp.uint8)
  variables = m.init(jax.random.key(0), x, train=False)
  run = lambda key: m.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(key)})[0]
  assert not np.allclose(run(1), run(2))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  m = model_lib.PosterCNN(num_classes=3, conv_features=(4, 4, 8, 8), dense_features=(8, 8),
                          dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  variables = m.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert m.apply(variables, x, train=False).dtype == jnp.float32
