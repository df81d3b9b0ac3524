"""What evaluation, prediction and reports share with training, without the training loop.

Data parallel without pmap: one 1-D device mesh ('data',) over every device of
every host; batches are sharded along 'data', variables replicated. Restoring
for inference reads only the checkpointed state's own metadata, so it needs
neither the optimizer nor the train state class: any run's checkpoint restores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from poster_cnn import model as model_lib
from poster_cnn import preprocess
from poster_cnn.data import pipeline

DATA_AXIS = "data"

# (variables, global batch {'image': uint8 (B, H, W, 3)}) -> float32 (B, K) probabilities;
# the images at the dataset's carrier size when the step was built with image options.
EvalFn = Callable[[dict, dict], jax.Array]


# ---------------------------------------------------------------- mesh and batches


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Host-local numpy batch -> global arrays sharded along 'data'."""
  sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def image_options(config) -> pipeline.ImageOptions:
  return pipeline.ImageOptions(**config.image.to_dict())


def compute_dtype(config):
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--config.dtype must be 'float32' or 'bfloat16', not {config.dtype!r}")
  return jnp.dtype(config.dtype)


def create_model(config, num_classes: int):
  """The linen module a config describes, in the config's compute dtype."""
  return model_lib.create_model(config, num_classes, compute_dtype(config))


# ---------------------------------------------------------------- the eval step


def traced_under_mesh(fn, mesh: jax.sharding.Mesh):
  """`fn`, traced with `mesh` as the abstract mesh.

  Layers that XLA cannot partition itself (the oneDNN convolutions) read the mesh
  while traced to split their work per device (onednn_conv.conv3x3).
  """
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def eval_step(apply_fn, variables: dict, batch: dict,
              image: pipeline.ImageOptions | None = None) -> jax.Array:
  """Sigmoid probabilities float32 (B, K) of `batch['image']` in inference mode.

  `image`: resize the pipeline's uint8 batch on the device as training does, without
  augmentation (`preprocess.prepare`); None: the batch is the model's input as it is.
  """
  images = batch["image"] if image is None else preprocess.prepare(batch["image"], image)
  return jax.nn.sigmoid(apply_fn(variables, images, train=False))


def jit_eval_step(apply_fn, mesh: jax.sharding.Mesh,
                  image: pipeline.ImageOptions | None = None) -> EvalFn:
  """`eval_step` jitted with replicated variables and the batch sharded along 'data'."""
  data = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
  replicated = jax.NamedSharding(mesh, jax.P())
  step = functools.partial(eval_step, apply_fn, image=image)
  return jax.jit(traced_under_mesh(step, mesh), in_shardings=(replicated, data),
                 out_shardings=data)


# ---------------------------------------------------------------- restore


def restore_variables(manager, step: int, mesh: jax.sharding.Mesh) -> dict:
  """The variables to infer with from a checkpoint: the weight average if the run kept one.

  The state is restored replicated into the shapes its own metadata records, so
  the optimizer and train state class of the run are not needed.

  Returns:
    {'params': ..., 'batch_stats': ...} of jax arrays.
  """
  from poster_cnn import checkpoint  # orbax
  replicated = jax.NamedSharding(mesh, jax.P())
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                        manager.item_metadata(step)["state"])
  state = checkpoint.restore(manager, step, target)
  if state.get("ema"):
    return {"params": state["ema"]["params"], "batch_stats": state["ema"]["batch_stats"]}
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


class Predictor:
  """A restored checkpoint ready to score images: model, variables, jitted step, mesh."""

  def __init__(self, run, step: int):
    """Args: run, a `run_dir.RunDir`; step, an existing checkpoint step."""
    from poster_cnn import checkpoint
    self.run, self.step = run, step
    self.config = run.config()
    self.vocabulary = run.vocabulary()
    self.mesh = create_mesh()
    self.model = create_model(self.config, len(self.vocabulary))
    manager = checkpoint.create_manager(str(run.path), read_only=True)
    try:
      self.variables = restore_variables(manager, step, self.mesh)
    finally:
      manager.close()
    self.eval_fn = jit_eval_step(self.model.apply, self.mesh, image_options(self.config))

  @property
  def checkpoint(self) -> dict:
    """{'path', 'step'}: which checkpoint answers, for every output to name."""
    return {"path": str(self.run.checkpoint(self.step)), "step": self.step}

  def batch_size(self, size: int) -> int:
    """`size` rounded up to a multiple of the devices."""
    devices = self.mesh.devices.size
    return -(-size // devices) * devices

  def probabilities(self, images: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    """uint8 (n, H, W, 3) host images as the pipeline ships them (at the dataset's
    carrier size, `pipeline.decode_stored`) -> float32 (n, K).

    Pads to `pad_to` (one compiled shape for every batch) or to a multiple of the devices.
    """
    size = self.batch_size(max(len(images), pad_to or 0))
    padded = np.zeros((size, *images.shape[1:]), np.uint8)
    padded[: len(images)] = images
    probs = self.eval_fn(self.variables, global_batch({"image": padded}, self.mesh))
    return np.asarray(probs)[: len(images)]


# ---------------------------------------------------------------- a whole split


def predict_split(eval_fn: EvalFn, variables: dict, batches: Iterable[dict],
                  mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Runs `eval_fn` over every batch; returns every process's results on every host.

  Returns {'scores': float32 (N, K), 'labels': uint8 (N, K), 'index': int64 (N,)}
  with padding removed and rows ordered by record index.
  """
  outputs = {"scores": [], "labels": [], "mask": [], "index": []}
  for batch in batches:
    probs = eval_fn(variables, global_batch({"image": batch["image"]}, mesh))
    host = {"labels": batch["labels"], "mask": batch["mask"], "index": batch["index"]}
    gathered = multihost_utils.process_allgather(
        {"scores": probs, **global_batch(host, mesh)}, tiled=True)
    for k in outputs:
      outputs[k].append(np.asarray(gathered[k]))
  out = {k: np.concatenate(v) for k, v in outputs.items()}
  keep = out.pop("mask").astype(bool)
  out = {k: v[keep] for k, v in out.items()}
  order = np.argsort(out["index"], kind="stable")
  return {k: v[order] for k, v in out.items()}


def predict_dataset(config, eval_fn: EvalFn, variables: dict, mesh: jax.sharding.Mesh,
                    data_dir: str, split: str) -> dict[str, np.ndarray]:
  """`predict_split` over one split of a converted dataset, in the config's image options."""
  ds = pipeline.eval_dataset(
      data_dir, split, global_batch_size=config.eval_batch_size, image=image_options(config),
      num_workers=config.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count())
  it = iter(ds)
  try:
    return predict_split(eval_fn, variables, it, mesh)
  finally:
    close(it)


def read_examples(data_dir: str, split: str, indices) -> list[dict]:
  """Records `indices` of a split, decoded: {'image' (encoded bytes), 'id', 'title', 'labels'}.

  For the few posters logs and reports show; a whole split goes through `predict_dataset`.
  Raw pixels (--image_format=raw) come back encoded as PNG, losslessly.
  """
  from poster_cnn.data import records, tfrecord
  meta = records.read_metadata(data_dir)
  source = tfrecord.TFRecordSource(records.split_files(data_dir, meta, split))
  examples = [records.decode_example(source[int(i)]) for i in indices]
  if pipeline.image_format(meta) == "raw":
    for ex in examples:
      ex["image"] = _png(pipeline.decode_stored(ex["image"], meta.image_size, "raw"))
  return examples


def _png(pixels: np.ndarray) -> bytes:
  import io
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "PNG")
  return out.getvalue()


def close(it) -> None:
  """Stops an iterator's worker processes, where it has any."""
  fn = getattr(it, "close", None)
  if fn is not None:
    fn()
