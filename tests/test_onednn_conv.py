"""The oneDNN convolution (poster_cnn/onednn_conv.py): values, gradients, threads, refusals.

Its agreement with nn.Conv inside the models is tested with the other formulations in
test_model.py.
"""

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import default
from poster_cnn import model as model_lib, onednn_conv

needs_onednn = pytest.mark.skipif(not onednn_conv.available(),
                                  reason=f"oneDNN unavailable: {onednn_conv.load_error()}")


def _reference(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _value_and_grads(conv):
  return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1)))


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 7, 10, 5, 6), (1, 1, 1, 2, 3), (2, 9, 4, 16, 8)])
def test_values_and_gradients_match_xla_for_odd_shapes(shape):
  b, h, w, c, k = shape
  x = jax.random.normal(jax.random.key(0), (b, h, w, c))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, c, k))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(onednn_conv.conv3x3(x, kernel), _reference(x, kernel),
                               rtol=1e-5, atol=1e-5)
    (v, grads), (v_ref, grads_ref) = (_value_and_grads(f)(x, kernel)
                                      for f in (onednn_conv.conv3x3, _reference))
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for got, want in zip(grads, grads_ref):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 7, 10, 5, 6), (2, 9, 4, 16, 8)])
def test_fused_bias_relu_matches_the_unfused_ops(shape):
  b, h, w, c, k = shape
  x = jax.random.normal(jax.random.key(0), (b, h, w, c))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, c, k))
  bias = jax.random.normal(jax.random.key(2), (k,))

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(conv(*a))), argnums=(0, 1, 2)))

  unfused = lambda x, k, b: jax.nn.relu(_reference(x, k) + b)
  with jax.default_matmul_precision("highest"):
    y = onednn_conv.conv3x3_bias_relu(x, kernel, bias)
    np.testing.assert_allclose(y, unfused(x, kernel, bias), rtol=1e-5, atol=1e-5)
    (v, grads), (v_ref, grads_ref) = (loss(f)(x, kernel, bias)
                                      for f in (onednn_conv.conv3x3_bias_relu, unfused))
  assert 0.2 < float(jnp.mean(y == 0)) < 0.8  # both sides of the ReLU are exercised
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for got, want in zip(grads, grads_ref):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (3, 7, 9, 4), (1, 2, 2, 1)])
def test_max_pooling_matches_the_xla_formulation_bitwise_with_ties(shape):
  # Rounded values put ties in most windows; ties must go to the window's first element.
  x = jnp.round(jax.random.normal(jax.random.key(0), shape))
  g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

  def vjp(pool):
    return jax.jit(lambda x, g: (lambda y, f: (y, f(g)[0]))(*jax.vjp(pool, x)))

  y, dx = vjp(onednn_conv.max_pool_2x2)(x, g)
  y_ref, dx_ref = vjp(model_lib.max_pool_2x2)(x, g)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)


@needs_onednn
def test_concurrent_calls_from_threads_give_each_its_own_result():
  # XLA may run independent custom calls at once, and several jitted functions may run
  # from different Python threads: the cached oneDNN plans must not share buffers.
  f = _value_and_grads(onednn_conv.conv3x3)
  inputs = [(jax.random.normal(jax.random.key(i), (4, 12, 12, 8)),
             jax.random.normal(jax.random.key(100 + i), (3, 3, 8, 16))) for i in range(8)]
  serial = [jax.tree.map(np.asarray, f(*a)) for a in inputs]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    parallel = list(pool.map(lambda a: jax.tree.map(np.asarray, f(*a)), inputs * 3))
  for i, got in enumerate(parallel):
    jax.tree.map(np.testing.assert_array_equal, got, serial[i % len(inputs)])


@needs_onednn
def test_wrong_dtypes_and_shapes_are_refused_before_running():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(TypeError, match="float32"):
    onednn_conv.conv3x3(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 3, 2), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"\(3, 3, 3, K\)"):
    onednn_conv.conv3x3(x, jnp.zeros((3, 3, 4, 2)))


@needs_onednn
def test_onednn_with_bfloat16_names_both_flags():
  config = default.get_config()
  config.model.conv_impl = "onednn"
  with pytest.raises(ValueError, match="conv_impl=onednn.*--config.dtype=bfloat16"):
    model_lib.create_model(config, 13, jnp.bfloat16)


def test_without_the_extension_auto_falls_back_and_onednn_is_refused(monkeypatch):
  monkeypatch.setattr(onednn_conv, "load_error", lambda: "ImportError: not built")
  assert model_lib.resolve_conv_impl("auto", "cpu") == "im2col"
  config = default.get_config()
  assert model_lib.create_model(config, 13).conv_impl == "im2col"
  config.model.conv_impl = "onednn"
  with pytest.raises(ValueError, match="conv_impl=onednn is unavailable here.*not built"):
    model_lib.create_model(config, 13)
  with pytest.raises(RuntimeError, match="not built"):
    onednn_conv.conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)))


def test_onednn_off_the_cpu_is_refused(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config = default.get_config()
  assert model_lib.create_model(config, 13).conv_impl == "xla"
  config.model.conv_impl = "onednn"
  with pytest.raises(ValueError, match="conv_impl=onednn runs on the CPU, not gpu"):
    model_lib.create_model(config, 13)


def test_an_extension_built_against_a_newer_jaxlib_is_refused_before_registering():
  # XLA fails its whole CPU backend on handlers of a newer FFI version than its own.
  assert "built against jaxlib 0.11.0, newer than the installed 0.10.2; reinstall" in (
      onednn_conv._jaxlib_mismatch("0.11.0", "0.10.2"))
  for built in ("0.10.0", "0.10.2", "0.5.0", "unknown"):
    assert onednn_conv._jaxlib_mismatch(built, "0.10.2") is None
