"""Training: sharded train/eval steps and `train_and_evaluate(config, workdir)`.

Data parallel without pmap: one `jax.jit` step over a 1-D device mesh
('data',) spanning every device of every host. Batches are sharded along
'data'; the train state is replicated. Because linen BatchNorm computes its
batch mean over the whole (global) array it is given, its statistics are
those of the global batch, synchronised across devices by XLA, with no
`axis_name` or `pmean`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from flax.training import train_state
from jax.experimental import multihost_utils

from poster_cnn import checkpoint, logs, losses, metrics, mixup, model as model_lib, optimizer
from poster_cnn import preprocess
from poster_cnn.data import pipeline, records

RUN_INFO_FILE = checkpoint.RUN_INFO_FILE
DATA_AXIS = "data"


class TrainState(train_state.TrainState):
  """Params, optimizer state and step, plus BatchNorm statistics and the base RNG.

  `rng` is raw uint32 key data (checkpointable); the dropout key of each step
  is derived from it and the step, so a resumed run draws the same masks.
  """

  batch_stats: Any = None
  rng: jax.Array = None

  def inference_variables(self) -> dict:
    """The variables to evaluate and predict with."""
    return {"params": self.params, "batch_stats": self.batch_stats}


class AveragedTrainState(TrainState):
  """A TrainState that also keeps `ema`, an exponential moving average of
  {'params', 'batch_stats'} updated every step (`--config.ema_decay` > 0);
  evaluation, checkpoint selection and prediction use the average.

  A subclass rather than an optional field, so runs without an average keep the
  checkpoint layout they always had.
  """

  ema: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)

  def inference_variables(self) -> dict:
    return self.ema


class NonFiniteLossError(RuntimeError):
  pass


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


# ---------------------------------------------------------------- state


def state_factory(config, num_classes: int, total_steps: int, mesh: jax.sharding.Mesh):
  """How to make the train state a config describes, without making it yet.

  Returns (init, abstract, schedule): `init()` creates the replicated state
  directly with its sharding (no host copy); `abstract` is its shapes, dtypes
  and shardings, the target for restoring a checkpoint.
  """
  model = model_lib.create_model(config, num_classes, compute_dtype(config))
  tx, schedule = optimizer.create_optimizer(config.optimizer, total_steps)
  image_shape = (config.image.height, config.image.width, 3)
  ema_decay = float(config.get("ema_decay", 0.0))  # absent from configs of older runs
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"--config.ema_decay={ema_decay} must be in [0, 1); 0 turns it off")

  def init():
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variables = model.init({"params": init_rng}, jnp.zeros((1, *image_shape), jnp.uint8),
                           train=False)
    fields = dict(apply_fn=model.apply, params=variables["params"],
                  batch_stats=variables["batch_stats"], tx=tx,
                  rng=jax.random.key_data(state_rng))
    if not ema_decay:
      return TrainState.create(**fields)
    return AveragedTrainState.create(**fields, ema=dict(variables), ema_decay=ema_decay)

  replicated = jax.NamedSharding(mesh, jax.P())
  shapes = jax.eval_shape(init)
  shardings = jax.tree.map(lambda _: replicated, shapes)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return jax.jit(init, out_shardings=shardings), abstract, schedule


def train_step(state: TrainState, batch: dict,
               loss_fn: losses.LossFn = losses.multilabel_loss,
               mixup_alpha: float = 0.0,
               image: pipeline.ImageOptions | None = None) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch; returns the new state and metrics.

  `loss_fn(logits, labels, mask)` -> scalar; the paper's binary cross-entropy by default.
  `mixup_alpha` > 0 blends the batch's examples first (poster_cnn/mixup.py).
  `image`: resize and augment the pipeline's uint8 batch on the device first
  (poster_cnn/preprocess.py); None: the batch is the model's input as it is.
  """
  dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images, labels, mask = batch["image"], batch["labels"], batch["mask"]
  if image is not None:
    # Its own stream of the step's key: dropout masks stay those of a run without it.
    images = preprocess.prepare(images, image, jax.random.fold_in(dropout_rng, 2))
  if mixup_alpha:
    # Its own stream, so the dropout masks stay those of a run without mixup.
    images, labels, mask = mixup.mixup(jax.random.fold_in(dropout_rng, 1), images, labels,
                                       mask, mixup_alpha)

  def objective(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    return loss_fn(logits, labels, mask), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  step = state.step
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if isinstance(state, AveragedTrainState):
    new = {"params": state.params, "batch_stats": state.batch_stats}
    state = state.replace(ema=optimizer.ema_update(state.ema, new, state.ema_decay, step))
  return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(state: TrainState, batch: dict,
              image: pipeline.ImageOptions | None = None) -> jax.Array:
  """Sigmoid probabilities float32 (B, K) in inference mode (the weight average if kept).

  `image`: resize the pipeline's batch on the device as training does, without augmentation.
  """
  images = batch["image"] if image is None else preprocess.prepare(batch["image"], image)
  logits = state.apply_fn(state.inference_variables(), images, train=False)
  return jax.nn.sigmoid(logits)


def jit_steps(state: TrainState, mesh: jax.sharding.Mesh,
              loss_fn: losses.LossFn = losses.multilabel_loss, mixup_alpha: float = 0.0,
              image: pipeline.ImageOptions | None = None):
  """The jitted train and eval steps, with shardings fixed so they compile once.

  `image` (train.image_options(config)) makes both steps take the pipeline's batches as
  they come (uint8 at the dataset's carrier size) and preprocess them on the device;
  without it they take model-sized images.
  """
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  data = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
  replicated = jax.NamedSharding(mesh, jax.P())

  def traced_under_mesh(fn):
    # Layers that XLA cannot partition itself (the oneDNN convolutions) read the mesh
    # while traced to split their work per device (onednn_conv.conv3x3).
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args)
    return wrapped

  train = jax.jit(traced_under_mesh(functools.partial(train_step, loss_fn=loss_fn,
                                                      mixup_alpha=mixup_alpha, image=image)),
                  in_shardings=(state_sharding, data), out_shardings=(state_sharding, replicated),
                  donate_argnums=0)
  evaluate = jax.jit(traced_under_mesh(functools.partial(eval_step, image=image)),
                     in_shardings=(state_sharding, data),
                     out_shardings=data)
  return train, evaluate


# ---------------------------------------------------------------- evaluation


def predict_split(eval_fn, state: TrainState, batches, mesh: jax.sharding.Mesh
                  ) -> dict[str, np.ndarray]:
  """Runs `eval_fn` over every batch; returns every process's results on every host.

  Returns {'scores': float32 (N, K), 'labels': uint8 (N, K), 'index': int64 (N,)}
  with padding removed and rows ordered by record index.
  """
  outputs = {"scores": [], "labels": [], "mask": [], "index": []}
  for batch in batches:
    probs = eval_fn(state, global_batch({"image": batch["image"]}, mesh))
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


def evaluate_split(config, state: TrainState, eval_fn, mesh, data_dir: str, split: str,
                   thresholds: np.ndarray | None = None) -> tuple[dict, dict]:
  """Metrics on a whole split. Returns (metrics summary, raw predictions)."""
  ds = pipeline.eval_dataset(
      data_dir, split, global_batch_size=config.eval_batch_size, image=image_options(config),
      num_workers=config.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count())
  it = iter(ds)
  try:
    preds = predict_split(eval_fn, state, it, mesh)
  finally:
    _close(it)
  summary = metrics.summarize(preds["scores"], preds["labels"], thresholds=thresholds)
  return summary, preds


def _close(it) -> None:
  close = getattr(it, "close", None)
  if close is not None:
    close()


# ---------------------------------------------------------------- run info


def write_run_info(workdir: str, config, meta: records.DatasetMetadata) -> None:
  """What evaluation and prediction need besides the checkpoint itself."""
  info = {"config": json.loads(config.to_json_best_effort()),
          "vocabulary": list(meta.vocabulary)}
  path = os.path.join(workdir, RUN_INFO_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, path)


def read_run_info(workdir: str) -> tuple[ml_collections.ConfigDict, tuple[str, ...]]:
  path = os.path.join(workdir, RUN_INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a poster-cnn training workdir?")
  with open(path) as f:
    info = json.load(f)
  return ml_collections.ConfigDict(info["config"]), tuple(info["vocabulary"])


# ---------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(losses: list[tuple[int, jax.Array]], manager) -> None:
  for step, loss in losses:
    value = float(loss)
    if not math.isfinite(value):
      last = manager.latest_step()
      raise NonFiniteLossError(
          f"loss is {value} at step {step}; last good checkpoint: "
          + (f"step {last} in {manager.directory}" if last is not None else "none")
          + ". Lower --config.optimizer.learning_rate or set grad_clip_norm.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluating and checkpointing along the way; resumes from `workdir`.

  Returns the last validation metrics.
  """
  if not config.data_dir:
    raise ValueError("--config.data_dir is required: a directory written by "
                     "poster-cnn-convert")
  if config.mixup_alpha < 0:
    raise ValueError(f"--config.mixup_alpha must be >= 0 (0 = off), not {config.mixup_alpha}")
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  meta = records.read_metadata(config.data_dir)

  mesh = create_mesh()
  if config.batch_size <= 0 or config.batch_size % jax.device_count():
    raise ValueError(f"--config.batch_size={config.batch_size} is not a positive multiple "
                     f"of the {jax.device_count()} devices")
  steps_per_epoch = meta.splits[config.train_split].num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"split {config.train_split!r} has fewer examples than one batch")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  ckpt_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else eval_every

  init, abstract_state, schedule = state_factory(config, meta.num_classes, total_steps, mesh)
  state = init()
  train_split = meta.splits[config.train_split]
  loss_fn = losses.create_loss(config.loss, train_split.positives, train_split.num_examples)
  # Only now that every option has been checked (above and in the factories): a bad
  # flag must not leave a workdir behind, nor rewrite the run info of one it resumes.
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
    write_run_info(workdir, config, meta)
  train_fn, eval_fn = jit_steps(state, mesh, loss_fn, config.mixup_alpha, image_options(config))

  train_ds = pipeline.train_dataset(
      config.data_dir, config.train_split, global_batch_size=config.batch_size,
      image=image_options(config), seed=config.seed, num_workers=config.num_workers,
      process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(train_ds)

  manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
  restored_step, restored = checkpoint.restore_latest(manager, abstract_state, train_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from checkpoint at step %d", restored_step)
  start_step = int(state.step)

  writer = logs.MetricWriter(workdir, enabled=is_chief)
  logging.info("process %d/%d, devices: %d global, %d local (%s); %d steps of %d "
               "(%d per epoch) from step %d; 3x3 convolutions: %s", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count(),
               jax.devices()[0].platform, total_steps, config.batch_size, steps_per_epoch,
               start_step, model_lib.resolve_conv_impl(config.model.get("conv_impl", "auto"),
                                                       dtype=compute_dtype(config)))

  last_eval: dict = {}
  pending: list[tuple[int, jax.Array]] = []
  window_start, window_steps = time.perf_counter(), 0
  run_start = time.perf_counter()
  step = start_step
  with _Preemption() as preemption:
    try:
      while step < total_steps:
        batch = global_batch(_next_batch(train_iter, step, config), mesh)
        state, step_metrics = train_fn(state, batch)
        step += 1
        window_steps += 1
        pending.append((step, step_metrics["loss"]))

        if step % config.log_every_steps == 0 or step == total_steps:
          _check_finite(pending, manager)
          elapsed = time.perf_counter() - window_start
          rate = window_steps * config.batch_size / elapsed
          loss = float(pending[-1][1])
          eta = (total_steps - step) * elapsed / window_steps
          writer.write(step, {"loss": loss, "grad_norm": step_metrics["grad_norm"],
                              "learning_rate": schedule(step - 1), "images_per_s": rate})
          logging.info("step %d/%d  loss %.4f  %.1f img/s  eta %s", step, total_steps,
                       loss, rate, _format_seconds(eta))
          pending.clear()
          window_start, window_steps = time.perf_counter(), 0

        evaluate_now = step % eval_every == 0 or step == total_steps
        if evaluate_now:
          _check_finite(pending, manager)
          last_eval, _ = evaluate_split(config, state, eval_fn, mesh, config.data_dir,
                                        config.eval_split)
          writer.write(step, last_eval, split=config.eval_split)
          logging.info("step %d  %s macro mAP %.4f  micro mAP %.4f  F1@top%d %.4f", step,
                       config.eval_split, last_eval["macro_map"], last_eval["micro_map"],
                       config.top_k, last_eval.get(f"f1_top{config.top_k}", float("nan")))
        if evaluate_now or step % ckpt_every == 0 or preemption.requested:
          checkpoint.save(manager, step, state, train_iter,
                          metrics=_checkpoint_metrics(last_eval) if evaluate_now else None)
        if evaluate_now:
          # img/s and ETA measure training alone: the next window starts here, with
          # the steps before the evaluation (already waited for) left out of it.
          window_start, window_steps = time.perf_counter(), 0
        if preemption.requested:
          logging.warning("stopping at step %d after preemption", step)
          break
    finally:
      manager.wait_until_finished()
      writer.close()
      _close(train_iter)
  logging.info("trained %d steps in %s", step - start_step,
               _format_seconds(time.perf_counter() - run_start))
  return last_eval


def _next_batch(it, step: int, config) -> dict:
  try:
    return next(it)
  except RuntimeError as e:
    if "Worker process" not in str(e):
      raise
    raise RuntimeError(
        f"an input worker process died at step {step} ({e}). The usual cause is "
        f"memory: lower --config.num_workers (now {config.num_workers}) or "
        "--config.batch_size") from e


def _checkpoint_metrics(summary: dict) -> dict:
  """The scalar metrics stored beside a checkpoint (orbax writes them as JSON)."""
  return {k: float(v) for k, v in summary.items()
          if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))}


def _format_seconds(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
