"""poster_cnn.dropout: nn.Dropout's behaviour from a quarter of the random hashes."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poster_cnn import dropout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 0.9])
def test_each_element_is_kept_with_the_rounded_probability(rate):
  keep = np.asarray(dropout.keep_mask(jax.random.key(0), (64, 32, 32, 13), rate))
  p = dropout.keep_threshold(rate) / 2**16
  assert abs(p - (1 - rate)) <= 2**-17
  # 852K draws: the kept fraction within 5 standard deviations, overall and for each
  # of the four 16-bit slices of a hash (positions 0..3 mod 4 of the last axis).
  sd = np.sqrt(p * (1 - p) / keep.size)
  assert abs(keep.mean() - p) < 5 * sd
  for j in range(4):
    part = keep[..., j::4]
    assert abs(part.mean() - p) < 5 * np.sqrt(p * (1 - p) / part.size)


def test_draws_are_uncorrelated_within_and_across_hashes():
  keep = np.asarray(dropout.keep_mask(jax.random.key(1), (256, 1024), 0.5), np.float64)
  x = keep - keep.mean()
  sd = 1 / np.sqrt(x[:, 1:].size)  # of a correlation estimate under independence
  for lag in (1, 2, 3, 4, 5):  # lags 1-3 pair draws of one hash, 4 the same slice of the next
    corr = np.mean(x[:, lag:] * x[:, :-lag]) / x.var()
    assert abs(corr) < 5 * sd, (lag, corr)
  rows = np.mean(x[1:] * x[:-1]) / x.var()
  assert abs(rows) < 5 * sd


def test_masks_depend_on_the_key_and_the_last_axis_may_be_any_length():
  a = dropout.keep_mask(jax.random.key(2), (3, 7), 0.5)
  assert a.shape == (3, 7) and a.dtype == jnp.bool_
  assert np.array_equal(a, dropout.keep_mask(jax.random.key(2), (3, 7), 0.5))
  assert not np.array_equal(dropout.keep_mask(jax.random.key(2), (64, 64), 0.5),
                            dropout.keep_mask(jax.random.key(3), (64, 64), 0.5))
  assert dropout.keep_mask(jax.random.key(2), (), 0.5).shape == ()
  assert bool(jnp.all(dropout.keep_mask(jax.random.key(2), (5, 5), 1e-9)))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    dropout.keep_threshold(1.5)


def test_the_layer_matches_nn_dropout_semantics():
  x = jnp.ones((8, 16, 16, 4))
  layer = dropout.Dropout(0.25)
  k = {"dropout": jax.random.key(0)}
  assert np.array_equal(layer.apply({}, x, deterministic=True), x)
  y = layer.apply({}, x, deterministic=False, rngs=k)
  kept = np.asarray(y) != 0
  scale = 2**16 / dropout.keep_threshold(0.25)
  np.testing.assert_allclose(np.asarray(y)[kept], scale, rtol=1e-6)
  assert 0.7 < kept.mean() < 0.8
  assert np.array_equal(dropout.Dropout(1.0).apply({}, x, deterministic=False, rngs=k), 0 * x)
  assert np.array_equal(dropout.Dropout(0.0).apply({}, x, deterministic=False, rngs=k), x)
  # broadcast_dims: one draw per example, as drop-connect uses it.
  y = dropout.Dropout(0.5, broadcast_dims=(1, 2, 3)).apply({}, x, deterministic=False, rngs=k)
  per_example = np.asarray(y).reshape(8, -1)
  assert all(len(set(row)) == 1 for row in per_example)
  # Gradients are the mask times the scale, as nn.Dropout's.
  g = jax.grad(lambda x: jnp.sum(layer.apply({}, x, deterministic=False, rngs=k)))(x)
  np.testing.assert_allclose(g, layer.apply({}, x, deterministic=False, rngs=k))
  assert isinstance(layer, nn.Module)


def test_the_mask_is_the_same_on_one_device_and_sharded_over_four():
  code = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from poster_cnn import dropout
      mesh = Mesh(np.array(jax.devices()), ("data",))
      f = lambda k: dropout.keep_mask(k, (8, 6, 5, 7), 0.3)
      one = np.asarray(jax.jit(f)(jax.random.key(5)))
      sharded = jax.jit(f, out_shardings=NamedSharding(mesh, P("data")))(jax.random.key(5))
      assert len(sharded.sharding.device_set) == 4
      assert np.array_equal(one, np.asarray(sharded)), "masks differ"
      print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
