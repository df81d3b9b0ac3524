"""optax optimizers and learning-rate schedules from a config's `optimizer` section."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from poster_cnn import efficientnet


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
  """`opt.schedule`: 'constant' or 'cosine' (linear warmup, then cosine to 0)."""
  warmup = int(opt.warmup_steps)
  if opt.schedule == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, opt.learning_rate, warmup),
           optax.constant_schedule(opt.learning_rate)], [warmup])
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  raise ValueError(f"unknown --config.optimizer.schedule={opt.schedule!r}; "
                   "use 'constant' or 'cosine'")


def decay_mask(params):
  """True for weights that get weight decay: kernels, not biases or BatchNorm."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


HEAD = efficientnet.HEAD  # the top-level params of a model's classifier


def head_labels(params) -> dict:
  """'head' for the classifier's params, 'backbone' for every other, as optax.multi_transform
  wants them; ValueError for a model without a classifier named HEAD."""
  if HEAD not in params:
    raise ValueError(f"--config.optimizer.backbone_lr_multiplier and freeze_backbone need a model "
                     f"whose classifier is named {HEAD!r} (--config.model.name="
                     f"efficientnet_lite0); this one has {sorted(params)}")
  return {k: jax.tree.map(lambda _, k=k: "head" if k == HEAD else "backbone", v)
          for k, v in params.items()}


def create_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation,
                                                     optax.Schedule]:
  """The optimizer and its schedule (the schedule is also logged).

  `opt.name`: 'adam' (the paper; Keras' epsilon 1e-7), 'adamw', or 'sgd'
  (with `opt.momentum`, Nesterov). `opt.grad_clip_norm` > 0 clips the global
  gradient norm first; `opt.accumulate_steps` > 1 averages gradients over that
  many steps before each update. `opt.backbone_lr_multiplier` != 1 scales the updates
  of every parameter outside the classifier (`head_labels`), `opt.freeze_backbone` zeroes
  them (fine-tuning pretrained weights).
  """
  schedule = learning_rate_schedule(opt, total_steps)
  if opt.name == "adam":
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay, mask=decay_mask)
  elif opt.name == "sgd":
    tx = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=bool(opt.momentum))
    if opt.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask), tx)
  else:
    raise ValueError(f"unknown --config.optimizer.name={opt.name!r}; "
                     "use 'adam', 'adamw' or 'sgd'")
  multiplier = float(opt.get("backbone_lr_multiplier", 1.0))  # absent from older runs' configs
  freeze = bool(opt.get("freeze_backbone", False))
  if not multiplier > 0:
    raise ValueError(f"--config.optimizer.backbone_lr_multiplier={multiplier} must be > 0; "
                     "to keep the backbone fixed set --config.optimizer.freeze_backbone=True")
  if freeze or multiplier != 1.0:
    # Scaling the update is scaling the learning rate (and adamw's decay with it).
    backbone = optax.set_to_zero() if freeze else optax.chain(tx, optax.scale(multiplier))
    tx = optax.multi_transform({"head": tx, "backbone": backbone}, head_labels)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  if opt.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(opt.accumulate_steps))
  return tx, schedule


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The averaging weight at `step` (0-based count of updates so far).

  `decay` capped by (1 + step) / (10 + step), so the average follows the weights
  closely early on, when they move fast, instead of remembering the random init.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(average, new, decay: float, step: jax.Array):
  """average <- d * average + (1 - d) * new, leaf by leaf, with d = ema_decay_at(decay, step).

  `average` and `new` are pytrees of float arrays with the same structure.
  """
  d = ema_decay_at(decay, step)
  return jax.tree.map(lambda a, n: (a + (1.0 - d) * (n - a)).astype(a.dtype), average, new)
