"""Training: the train state, the sharded train step and `train_and_evaluate(config, workdir)`.

Data parallel without pmap: one `jax.jit` step over a 1-D device mesh
('data',) spanning every device of every host (poster_cnn/inference.py, which
evaluation and prediction share). Batches are sharded along 'data'; the train
state is replicated. Because linen BatchNorm computes its batch mean over the
whole (global) array it is given, its statistics are those of the global
batch, synchronised across devices by XLA, with no `axis_name` or `pmean`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from flax.training import train_state
from jax.experimental import multihost_utils

from poster_cnn import checkpoint, inference, logs, losses, metrics, mixup, optimizer, options
from poster_cnn import model as model_lib
from poster_cnn import preprocess, pretrained
from poster_cnn.data import pipeline, records
from poster_cnn.inference import (DATA_AXIS, compute_dtype, create_mesh, global_batch,
                                  image_options)
from poster_cnn import run_dir as run_dir_lib
from poster_cnn.run_dir import RunDir


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


# ---------------------------------------------------------------- state


def state_factory(config, num_classes: int, total_steps: int, mesh: jax.sharding.Mesh):
  """How to make the train state a config describes, without making it yet.

  Returns (init, abstract, schedule): `init()` creates the replicated state
  directly with its sharding (no host copy); `abstract` is its shapes, dtypes
  and shardings, the target for restoring a checkpoint. With `config.init_from`
  set, `init()` first loads the matching variables of that checkpoint
  (poster_cnn/pretrained.py; ValueError naming every mismatch).
  """
  model = inference.create_model(config, num_classes)
  tx, schedule = optimizer.create_optimizer(config.optimizer, total_steps)
  image_shape = (config.image.height, config.image.width, 3)
  ema_decay = float(config.get("ema_decay", 0.0))  # absent from configs of older runs
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"--config.ema_decay={ema_decay} must be in [0, 1); 0 turns it off")

  def init(loaded=None):
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variables = model.init({"params": init_rng}, jnp.zeros((1, *image_shape), jnp.uint8),
                           train=False)
    if loaded:
      variables = pretrained.overlay(variables, loaded)
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
  jitted = jax.jit(init, out_shardings=shardings)
  if not config.get("init_from"):
    return jitted, abstract, schedule

  def init_from():
    # Read when the state is made, not here: evaluation builds `abstract` only.
    fresh = {"params": shapes.params, "batch_stats": shapes.batch_stats}
    return jitted(pretrained.init_from(config.init_from, fresh))

  return init_from, abstract, schedule


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


def jit_steps(state: TrainState, mesh: jax.sharding.Mesh,
              loss_fn: losses.LossFn = losses.multilabel_loss, mixup_alpha: float = 0.0,
              image: pipeline.ImageOptions | None = None):
  """The jitted train step and eval step, with shardings fixed so they compile once.

  Returns (train, evaluate): `train(state, batch) -> (state, metrics)`;
  `evaluate(variables, batch) -> probabilities` (`inference.jit_eval_step`), called
  with `state.inference_variables()`. `image` (`image_options(config)`) makes both take
  the pipeline's batches as they come (uint8 at the dataset's carrier size) and
  preprocess them on the device; without it they take model-sized images.
  """
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  data = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
  replicated = jax.NamedSharding(mesh, jax.P())
  step = functools.partial(train_step, loss_fn=loss_fn, mixup_alpha=mixup_alpha, image=image)
  train = jax.jit(inference.traced_under_mesh(step, mesh),
                  in_shardings=(state_sharding, data), out_shardings=(state_sharding, replicated),
                  donate_argnums=0)
  return train, inference.jit_eval_step(state.apply_fn, mesh, image)


def evaluate_split(config, state: TrainState, eval_fn, mesh, data_dir: str, split: str,
                   loss_fn: losses.LossFn | None = None) -> tuple[dict, dict]:
  """Validation metrics of the state being trained: (metrics summary, raw predictions).

  With `loss_fn` the summary also holds 'loss', the training loss on the split
  (from the probabilities, clipped to float32's open unit interval).
  """
  preds = inference.predict_dataset(config, eval_fn, state.inference_variables(), mesh,
                                    data_dir, split)
  summary = metrics.summarize(preds["scores"], preds["labels"])
  if loss_fn is not None and len(preds["labels"]):
    p = np.clip(preds["scores"].astype(np.float64), 1e-7, 1 - 1e-7)
    logits = jnp.asarray(np.log(p) - np.log1p(-p), jnp.float32)
    summary["loss"] = float(loss_fn(logits, jnp.asarray(preds["labels"]),
                                    jnp.ones(len(p), bool)))
  return summary, preds


# ---------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly.

  With several processes they must all stop after the same step (the save is a
  collective), though the signal reaches each at a different one: jax's
  preemption service (started by jax.distributed.initialize, with its own
  SIGTERM handler) agrees on that step, asked through `stop_at` every step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def stop_at(self, step: int) -> bool:
    """Whether to save and stop after `step`; call once per step, on every process."""
    if self._multiprocess:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __enter__(self):
    if self._multiprocess:
      return self
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


def _check_finite(losses: list[tuple[int, jax.Array]], manager, abstract_state) -> None:
  for step, loss in losses:
    value = float(loss)
    if not math.isfinite(value):
      raise NonFiniteLossError(f"loss is {value} at step {step}; "
                               + _last_good(manager, abstract_state))


def _last_good(manager, abstract_state) -> str:
  last = checkpoint.last_verified(manager, abstract_state)
  return ("last good checkpoint: "
          + (f"step {last} in {manager.directory} (verified)" if last is not None else "none")
          + ". Lower --config.optimizer.learning_rate or set grad_clip_norm.")


class ConfigChangedError(ValueError):
  """A resumed workdir's saved config differs in a field its checkpoints depend on."""


def _resume_changes(run: RunDir, config, meta: records.DatasetMetadata) -> dict | None:
  """The history entry of this start; raises ConfigChangedError before anything is touched.

  A workdir with checkpoints is resumed: its saved config is compared with this
  one. Differences in what the checkpointed state's shapes or labels depend on
  (`run_dir.structural`) stop the run, listing the fields; the others are
  logged and recorded in the run info's history.
  """
  if not run.run_info_file.exists():
    return {"event": "start"}
  info = run.read_info()
  saved = {**info["config"], "vocabulary": info["vocabulary"]}
  new = {**config.to_dict(), "vocabulary": list(meta.vocabulary)}
  changes = run_dir_lib.config_changes(saved, new)
  if not run.steps():  # nothing was checkpointed: nothing to keep consistent with
    return {"event": "start", "changes": {k: list(v) for k, v in changes.items()}}
  fatal = {k: v for k, v in changes.items() if run_dir_lib.structural(k)}
  if fatal:
    fields = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in fatal.items())
    raise ConfigChangedError(
        f"{run.path} holds checkpoints of a run whose config differs in fields the saved "
        f"state depends on:\n{fields}\nResume with the saved values, or train in another "
        "--workdir. (Nothing was changed in this one.)")
  for k, (a, b) in changes.items():
    logging.warning("resuming %s with --config.%s changed: %r -> %r", run.path, k, a, b)
  return {"event": "resume", "from_step": run.steps()[-1],
          "changes": {k: list(v) for k, v in changes.items()}}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluating and checkpointing along the way; resumes from `workdir`.

  Returns the last validation metrics.
  """
  if not config.data_dir:
    raise options.OptionError("--config.data_dir is required: a directory written by "
                              "poster-cnn-convert")
  run = RunDir(workdir)
  workdir = os.fspath(run.path)
  checkpoint.checkpoint_dir(workdir)  # a workdir orbax cannot save to fails before any write
  is_chief = jax.process_index() == 0
  meta = records.read_metadata(config.data_dir)
  options.validate(config, meta, jax.device_count())
  history_entry = _resume_changes(run, config, meta)

  mesh = create_mesh()
  steps_per_epoch = meta.splits[config.train_split].num_examples // config.batch_size
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
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_info(config, meta, history_entry=history_entry)
  train_fn, eval_fn = jit_steps(state, mesh, loss_fn, config.mixup_alpha, image_options(config))

  train_ds = pipeline.train_dataset(
      config.data_dir, config.train_split, global_batch_size=config.batch_size,
      image=image_options(config), seed=config.seed, num_workers=config.num_workers,
      process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(train_ds)

  manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
  restored_step, restored = checkpoint.restore_latest(
      manager, abstract_state, train_iter,
      batch_size=pipeline.local_batch_size(config.batch_size, jax.process_count()))
  if restored is not None:
    state = restored
    logging.info("resumed from checkpoint at step %d", restored_step)
  else:  # a fresh start reads from the start, whatever checkpoints were tried
    inference.close(train_iter)
    train_iter = iter(train_ds)
  start_step = int(state.step)

  writer = logs.MetricWriter(workdir, enabled=is_chief)
  posters = _tensorboard_posters(config, meta) if is_chief else None
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
        stop = preemption.stop_at(step)

        if step % config.log_every_steps == 0 or step == total_steps:
          _check_finite(pending, manager, abstract_state)
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
          _check_finite(pending, manager, abstract_state)
          last_eval, preds = evaluate_split(config, state, eval_fn, mesh, config.data_dir,
                                            config.eval_split, loss_fn)
          writer.write(step, last_eval, split=config.eval_split)
          if posters is not None:  # the split's first records, as preds are ordered
            n = len(posters)
            writer.write_posters(step, config.eval_split, posters, logs.captions(
                preds["labels"][:n], preds["scores"][:n], meta.vocabulary, config.top_k))
          logging.info("step %d  %s macro mAP %.4f  micro mAP %.4f  F1@top%d %.4f", step,
                       config.eval_split, last_eval["macro_map"], last_eval["micro_map"],
                       config.top_k, last_eval.get(f"f1_top{config.top_k}", float("nan")))
        if evaluate_now or step % ckpt_every == 0 or stop:
          _check_finite(pending, manager, abstract_state)  # never save a diverged state
          try:
            checkpoint.save(manager, step, state, train_iter,
                            metrics=_checkpoint_metrics(last_eval) if evaluate_now else None)
          except checkpoint.NonFiniteStateError as e:
            raise NonFiniteLossError(f"{e}; {_last_good(manager, abstract_state)}") from None
        if evaluate_now:
          # img/s and ETA measure training alone: the next window starts here, with
          # the steps before the evaluation (already waited for) left out of it.
          window_start, window_steps = time.perf_counter(), 0
        if stop:
          logging.warning("stopping at step %d after preemption", step)
          break
      if checkpoint.finish(manager):  # the last save went with its directory: again
        checkpoint.save(manager, step, state, train_iter)
    finally:
      with contextlib.ExitStack() as cleanup:  # last in, first run; each runs if one raised
        cleanup.callback(inference.close, train_iter)
        cleanup.callback(writer.close)
        cleanup.callback(lambda: writer.write_hparams(config, last_eval))
        cleanup.callback(checkpoint.finish, manager)
  logging.info("trained %d steps in %s", step - start_step,
               _format_seconds(time.perf_counter() - run_start))
  return last_eval


def _tensorboard_posters(config, meta: records.DatasetMetadata, n: int = 8
                         ) -> np.ndarray | None:
  """The first `n` posters of the eval split as the model sees them, uint8 (n, H, W, 3)."""
  if not config.eval_split:
    return None
  size = min(n, meta.splits[config.eval_split].num_examples)
  opts = image_options(config)
  carrier = pipeline.carrier_size(meta.image_size, opts, pipeline.image_format(meta))
  # read_examples gives raw pixels PNG-encoded: decoded at the carrier size all the same.
  stored = np.stack([pipeline.decode_stored(ex["image"], carrier, resize=opts.resize)
                     for ex in inference.read_examples(config.data_dir, config.eval_split,
                                                       range(size))])
  shown = preprocess.prepare(jnp.asarray(stored), opts)  # the eval step's resize
  return np.asarray(jnp.clip(jnp.round(shown), 0, 255).astype(jnp.uint8))


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
