import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from poster_cnn import model as model_lib, optimizer


def _opt(**overrides):
  opt = default.get_config().optimizer
  for k, v in overrides.items():
    opt[k] = v
  return opt


def _params():
  m = model_lib.PosterCNN(num_classes=3, conv_features=(4, 4, 4, 4), dense_features=(4, 4))
  return m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)["params"]


def test_weight_decay_skips_biases_and_batchnorm():
  params = _params()
  mask = optimizer.decay_mask(params)
  flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["Conv_0/kernel"] and flat["Dense_0/kernel"]
  assert not flat["Conv_0/bias"] and not flat["BatchNorm_0/scale"] and not flat["BatchNorm_0/bias"]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_decay_moves_only_kernels_when_gradients_are_zero(name):
  params = _params()
  tx, _ = optimizer.create_optimizer(_opt(name=name, weight_decay=0.1, learning_rate=0.1), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == optimizer.decay_mask(params)


def test_warmup_cosine_schedule():
  _, schedule = optimizer.create_optimizer(
      _opt(schedule="cosine", warmup_steps=10, learning_rate=1.0), 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_constant_schedule_with_warmup():
  _, schedule = optimizer.create_optimizer(_opt(warmup_steps=4, learning_rate=0.2), 100)
  assert float(schedule(2)) == pytest.approx(0.1)
  assert float(schedule(50)) == pytest.approx(0.2)


def test_gradient_clipping_bounds_the_update():
  params = {"w": jnp.zeros((3,))}
  tx, _ = optimizer.create_optimizer(
      _opt(name="sgd", momentum=0.0, learning_rate=1.0, grad_clip_norm=1.0), 10)
  updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8, 0.0], rtol=1e-6)


def test_gradient_accumulation_applies_the_mean_every_k_steps():
  params = {"w": jnp.zeros((1,))}
  tx, _ = optimizer.create_optimizer(
      _opt(name="sgd", momentum=0.0, learning_rate=1.0, accumulate_steps=2), 10)
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.array([1.0])}, state, params)
  u2, state = tx.update({"w": jnp.array([3.0])}, state, params)
  assert float(u1["w"][0]) == 0.0 and float(u2["w"][0]) == pytest.approx(-2.0)


@pytest.mark.parametrize("field,value", [("name", "rmsprop"), ("schedule", "step")])
def test_unknown_choices_name_the_flag(field, value):
  with pytest.raises(ValueError, match=f"--config.optimizer.{field}"):
    optimizer.create_optimizer(_opt(**{field: value}), 10)


def test_ema_decay_ramps_up_to_the_configured_value():
  got = [float(optimizer.ema_decay_at(0.99, s)) for s in (0, 1, 8, 10_000)]
  np.testing.assert_allclose(got, [0.1, 2 / 11, 0.5, 0.99], rtol=1e-6)


def test_ema_update_is_the_weighted_average_leaf_by_leaf():
  average = {"w": jnp.full((2,), 1.0), "b": {"x": jnp.zeros((3,))}}
  new = {"w": jnp.full((2,), 3.0), "b": {"x": jnp.ones((3,))}}
  out = optimizer.ema_update(average, new, 0.5, 100)  # d = 0.5 once step >= 8
  np.testing.assert_allclose(out["w"], 2.0)
  np.testing.assert_allclose(out["b"]["x"], 0.5)
