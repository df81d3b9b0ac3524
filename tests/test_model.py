import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from poster_cnn import losses, model as model_lib, onednn_conv, optimizer


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


# ---------------------------------------------------------------- conv formulations

import flax.linen as nn  # noqa: E402
import pytest  # noqa: E402



def _impl_param(impl: str):
  if impl == "onednn" and not onednn_conv.available():
    return pytest.param(impl, marks=pytest.mark.skip(
        reason=f"the oneDNN extension is unavailable: {onednn_conv.load_error()}"))
  return impl


_CONV_IMPLS = [_impl_param(i) for i in model_lib.CONV_IMPLS if i != "xla"]


@pytest.fixture
def full_float32():
  """GPUs multiply float32 as TF32 by default (about 1e-3 relative error), which would swamp
  the differences between formulations these tests look for; compute in full float32."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.usefixtures("full_float32")
@pytest.mark.parametrize("impl", _CONV_IMPLS)
@pytest.mark.parametrize("cin,cout", [(3, 16), (16, 32), (5, 7)])
def test_conv3x3_matches_nn_conv_outputs_and_gradients(impl, cin, cout):
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, cin))
  ref = nn.Conv(cout, (3, 3), padding="SAME")
  new = model_lib.Conv3x3(cout, impl)
  params = ref.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  assert jax.tree.map(jnp.shape, new.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(new.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)

  def grads(m):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(params, x)

  for got, want in zip(jax.tree.leaves(grads(new)), jax.tree.leaves(grads(ref))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.usefixtures("full_float32")
@pytest.mark.parametrize("impl", _CONV_IMPLS)
def test_conv_impls_share_params_and_outputs_in_the_paper_model(impl):
  x = jax.random.randint(jax.random.key(1), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  ref = _tiny_model()
  new = model_lib.PosterCNN(num_classes=3, conv_features=(4, 4, 8, 8), dense_features=(8, 8),
                            conv_impl=impl)
  variables = ref.init(jax.random.key(0), x, train=False)
  # Same names, shapes and initial values: checkpoints are interchangeable.
  new_variables = new.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(new_variables) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, new_variables, variables)

  def loss(m, params):
    logits, _ = m.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.key(2)})
    return jnp.sum(logits**2)

  (l_new, g_new), (l_ref, g_ref) = (jax.value_and_grad(lambda p, m=m: loss(m, p))(
      variables["params"]) for m in (new, ref))
  np.testing.assert_allclose(l_new, l_ref, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))


def test_paper_model_parameter_count_is_the_same_for_every_conv_impl():
  config = default.get_config()
  for impl in model_lib.CONV_IMPLS:
    config.model.conv_impl = impl
    m = model_lib.create_model(config, num_classes=13)
    assert m.conv_impl == impl
    shapes = jax.eval_shape(lambda m=m: m.init(jax.random.key(0),
                                               jnp.zeros((1, 224, 224, 3), jnp.uint8),
                                               train=False))
    assert _count(shapes["params"]) == 3_328_013


def test_auto_conv_impl_is_onednn_or_im2col_on_cpu_and_nn_conv_elsewhere():
  cpu = "onednn" if onednn_conv.available() else "im2col"
  assert model_lib.resolve_conv_impl("auto", "cpu") == cpu
  assert model_lib.resolve_conv_impl("auto", "cpu", jnp.bfloat16) == "im2col"
  assert model_lib.resolve_conv_impl("auto", "gpu") == "xla"
  assert model_lib.resolve_conv_impl("auto", "tpu") == "xla"
  assert model_lib.resolve_conv_impl("xla_wgrad_taps", "cpu") == "xla_wgrad_taps"
  platform = jax.default_backend()
  assert (model_lib.create_model(default.get_config(), 13).conv_impl
          == model_lib.resolve_conv_impl("auto", platform))


def test_unknown_conv_impl_is_rejected():
  with pytest.raises(ValueError, match="conv impl"):
    model_lib.Conv3x3(4, "nope").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------- max pooling

def _nn_max_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 2, 2, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_2x2_matches_nn_max_pool_values_and_gradients_with_ties(shape, dtype):
  # Rounded ReLU outputs: many windows hold equal maxima (zeros, or repeated values),
  # where the gradient must go to the first element of the window as nn.max_pool's does.
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), shape)), 1).astype(dtype)
  np.testing.assert_array_equal(model_lib.max_pool_2x2(x), _nn_max_pool(x))
  weights = jax.random.normal(jax.random.key(1), _nn_max_pool(x).shape).astype(dtype)

  def grad(pool):
    return jax.grad(lambda x: jnp.sum(pool(x) * weights).astype(jnp.float32))(x)

  got, want = grad(model_lib.max_pool_2x2), grad(_nn_max_pool)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- ResNet

def _tiny_resnet(impl="xla"):
  return model_lib.PosterResNet(num_classes=3, stem_features=4, stage_features=(4, 8),
                                blocks_per_stage=(1, 2), conv_impl=impl)


def test_resnet_blocks_start_as_the_identity_on_their_input():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
  block = model_lib.ResidualBlock(4, lambda **kw: nn.BatchNorm(use_running_average=True, **kw))
  variables = block.init(jax.random.key(1), x)
  np.testing.assert_allclose(block.apply(variables, x), x, rtol=1e-6)


def test_resnet_parameters_and_outputs_are_the_same_for_every_conv_impl():
  x = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  ref = _tiny_resnet()
  variables = ref.init(jax.random.key(0), x, train=False)
  # Non-zero residual branches, so the second convolutions count too.
  variables = jax.tree.map(lambda v: v + 0.05, variables)
  want = ref.apply(variables, x, train=False)
  assert want.shape == (2, 3) and want.dtype == jnp.float32
  for impl in _CONV_IMPLS:
    new = _tiny_resnet(impl)
    assert jax.tree.structure(new.init(jax.random.key(0), x, train=False)) == \
        jax.tree.structure(variables)
    np.testing.assert_allclose(new.apply(variables, x, train=False), want, rtol=1e-4, atol=1e-4)


def test_resnet_from_config_trains_its_batch_statistics():
  config = default.get_config()
  config.model.name = "resnet"
  config.model.stage_features = (8, 16)
  config.model.blocks_per_stage = (1, 1)
  m = model_lib.create_model(config, num_classes=4)
  assert isinstance(m, model_lib.PosterResNet)
  assert m.conv_impl == model_lib.resolve_conv_impl("auto", jax.default_backend())
  x = jax.random.randint(jax.random.key(1), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  variables = m.init(jax.random.key(0), x, train=False)
  logits, updates = m.apply(variables, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(2)})
  assert logits.shape == (4, 4)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_unknown_model_name_lists_the_known_ones():
  config = default.get_config()
  config.model.name = "vit"
  with pytest.raises(ValueError, match="'paper_cnn', 'resnet'"):
    model_lib.create_model(config, num_classes=4)


# ---------------------------------------------------------------- every config builds

_CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..",
                                                                "configs"))
                       if f.endswith(".py") and not f.startswith("_"))


def test_every_config_loads_from_the_installed_package(tmp_path):
  # Outside the checkout there is no top-level `configs`: a config importing from it
  # works in the repository and fails for every user of the package.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  code = ("import importlib\n"
          f"for name in {_CONFIG_NAMES!r}:\n"
          "  importlib.import_module(f'poster_cnn.configs.{name}').get_config()\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", _CONFIG_NAMES)
def test_every_config_builds_its_model_and_loss(name):
  config = importlib.import_module(f"poster_cnn.configs.{name}").get_config()
  m = model_lib.create_model(config, num_classes=15)
  shape = (1, config.image.height, config.image.width, 3)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(shape, jnp.uint8),
                                         train=False))
  assert _count(shapes["params"]) > 0
  losses.create_loss(config.loss, [10] * 15, 100)
  optimizer.create_optimizer(config.optimizer, 100)
