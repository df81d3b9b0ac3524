"""Fine-tuning: --config.init_from, the backbone's learning-rate multiplier and freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poster_cnn import optimizer, pretrained, train

from test_optimizer import _opt
from test_train import _config


def _params():
  return {"stem": {"kernel": jnp.ones((3, 3, 3, 4))}, "block_0": {"scale": jnp.ones(4)},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}


def _step(opt):
  """The update of one step with all-one gradients."""
  tx, _ = optimizer.create_optimizer(opt, 10)
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  return updates


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_backbone_multiplier_scales_only_the_backbones_updates(name):
  plain = _step(_opt(name=name, learning_rate=0.1))
  scaled = _step(_opt(name=name, learning_rate=0.1, backbone_lr_multiplier=0.1))
  np.testing.assert_allclose(scaled["head"]["kernel"], plain["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["stem"]["kernel"], 0.1 * plain["stem"]["kernel"], rtol=1e-5)
  np.testing.assert_allclose(scaled["block_0"]["scale"], 0.1 * plain["block_0"]["scale"],
                             rtol=1e-5)
  assert np.all(np.asarray(plain["stem"]["kernel"]) != 0)


def test_freezing_the_backbone_moves_only_the_head():
  updates = _step(_opt(freeze_backbone=True, grad_clip_norm=1.0, accumulate_steps=1))
  assert not np.any(updates["stem"]["kernel"]) and not np.any(updates["block_0"]["scale"])
  assert np.all(np.asarray(updates["head"]["kernel"]) != 0)


def test_bad_multiplier_and_a_model_without_head_are_clear_errors():
  with pytest.raises(ValueError, match="backbone_lr_multiplier=0.0 must be > 0"):
    optimizer.create_optimizer(_opt(backbone_lr_multiplier=0.0), 10)
  tx, _ = optimizer.create_optimizer(_opt(freeze_backbone=True), 10)
  with pytest.raises(ValueError, match=r"classifier is named 'head'.*\['Conv_0', 'Dense_0'\]"):
    tx.init({"Conv_0": jnp.ones(3), "Dense_0": jnp.ones(2)})


def test_init_from_loads_a_checkpoints_variables_into_a_fresh_state(tiny_dataset, tmp_path):
  mesh = train.create_mesh()
  source, _, _ = train.state_factory(_config(tiny_dataset, seed=1), 4, 3, mesh)
  state = source()
  # Made-up values, so the test sees they are loaded and not a coincidence of seeds.
  params = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), state.params)
  stats = jax.tree.map(lambda p: np.full(p.shape, 2.0, np.float32), state.batch_stats)
  pretrained.save_variables(tmp_path / "w", {"params": params, "batch_stats": stats})

  init, abstract, _ = train.state_factory(
      _config(tiny_dataset, seed=0, init_from=str(tmp_path / "w")), 4, 3, mesh)
  loaded = init()
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  jax.tree.map(np.testing.assert_array_equal, loaded.batch_stats, stats)
  assert int(loaded.step) == 0
  assert jax.tree.map(lambda x: x.shape, loaded) == jax.tree.map(lambda x: x.shape, abstract)


def test_init_from_names_every_mismatched_shape(tiny_dataset, tmp_path):
  mesh = train.create_mesh()
  c = _config(tiny_dataset)
  c.model.conv_features = (4, 8, 8, 8)
  source, _, _ = train.state_factory(c, 4, 3, mesh)
  state = source()
  pretrained.save_variables(tmp_path / "w", {"params": state.params,
                                             "batch_stats": state.batch_stats})
  init, _, _ = train.state_factory(_config(tiny_dataset, init_from=str(tmp_path / "w")), 4, 3,
                                   mesh)
  with pytest.raises(ValueError) as e:
    init()
  message = str(e.value)
  assert "variables do not match the model" in message
  assert "params/Conv_0/kernel: (3, 3, 3, 4) in the checkpoint" in message
  assert "batch_stats/BatchNorm_0/mean" in message
