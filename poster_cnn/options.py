"""One pass over a config's options, before anything is written or compiled.

Every bad value is reported with its flag (`--config.FIELD`), not as an error from
deep inside JAX, grain or a division by zero after the first training steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from poster_cnn import losses, model as model_lib, optimizer
from poster_cnn.data import records


class OptionError(ValueError):
  """A config value that cannot work; the message names the flag."""


def _split(meta: records.DatasetMetadata, data_dir: str, flag: str, name: str) -> None:
  if name not in meta.splits:
    raise OptionError(f"{flag}={name!r}: {data_dir} has no split {name!r}; its splits: "
                      f"{', '.join(sorted(meta.splits))}")


def _positive_multiple(flag: str, value, devices: int, processes: int) -> None:
  if not isinstance(value, int) or value <= 0 or value % devices or value % processes:
    raise OptionError(f"{flag}={value} must be a positive multiple of the {devices} "
                      f"device(s) ({processes} process(es))")


def validate(config, dataset: records.DatasetMetadata | None, devices: int | None = None, *,
             mode: str = "train", splits: Sequence[str] = ()) -> None:
  """Checks every option `mode` uses; raises OptionError naming the first bad one.

  Args:
    config: the run's ConfigDict.
    dataset: metadata of the dataset to read (None: not checked).
    devices: global device count (default: `jax.device_count()`).
    mode: 'train' checks everything; 'evaluate' and 'predict' what inference reads.
    splits: further splits of `dataset` that must exist (e.g. the one evaluated).
  """
  devices = devices or jax.device_count()
  processes = jax.process_count()
  img = config.image
  for side in ("height", "width"):
    if not isinstance(img[side], int) or img[side] <= 0:
      raise OptionError(f"--config.image.{side}={img[side]} must be a positive integer")
  if img.resize not in ("stretch", "pad"):
    raise OptionError(f"--config.image.resize={img.resize!r}: 'stretch' or 'pad'")
  if config.dtype not in ("float32", "bfloat16"):
    raise OptionError(f"--config.dtype must be 'float32' or 'bfloat16', not {config.dtype!r}")
  _positive_multiple("--config.eval_batch_size", config.eval_batch_size, devices, processes)
  if not isinstance(config.top_k, int) or config.top_k <= 0:
    raise OptionError(f"--config.top_k={config.top_k} must be a positive integer")
  if config.num_workers < 0:
    raise OptionError(f"--config.num_workers={config.num_workers} must be >= 0")
  num_classes = dataset.num_classes if dataset is not None else 1
  try:  # the model's own checks (name, conv_impl for this backend and dtype)
    model_lib.create_model(config, num_classes, jax.numpy.dtype(config.dtype))
  except ValueError as e:
    raise OptionError(str(e)) from None
  if dataset is not None:
    for name in splits:
      _split(dataset, config.data_dir, "--split", name)
  if mode != "train":
    return

  if not config.data_dir:
    raise OptionError("--config.data_dir is required: a directory written by "
                      "poster-cnn-convert")
  _positive_multiple("--config.batch_size", config.batch_size, devices, processes)
  if config.mixup_alpha < 0:
    raise OptionError(f"--config.mixup_alpha must be >= 0 (0 = off), not {config.mixup_alpha}")
  ema_decay = float(config.get("ema_decay", 0.0))
  if not 0.0 <= ema_decay < 1.0:
    raise OptionError(f"--config.ema_decay={ema_decay} must be in [0, 1); 0 turns it off")
  for name in ("log_every_steps", "keep_checkpoints"):
    if config[name] <= 0:
      raise OptionError(f"--config.{name}={config[name]} must be positive")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise OptionError("--config.num_epochs must be positive (or --config.num_train_steps)")
  if not 0 < img.crop_min_area <= 1:
    raise OptionError(f"--config.image.crop_min_area={img.crop_min_area} must be in (0, 1]")
  if img.color_jitter < 0:
    raise OptionError(f"--config.image.color_jitter={img.color_jitter} must be >= 0")
  if config.optimizer.get("freeze_backbone") and not config.get("init_from"):
    raise OptionError("--config.optimizer.freeze_backbone=True keeps the backbone as it "
                      "starts: it needs pretrained weights, --config.init_from=DIR (e.g. "
                      "from poster-cnn-convert-weights --output_dir=DIR)")
  try:
    optimizer.create_optimizer(config.optimizer, max(config.num_train_steps, 1))
  except ValueError as e:
    raise OptionError(str(e)) from None
  if dataset is None:
    return
  _split(dataset, config.data_dir, "--config.train_split", config.train_split)
  if config.eval_split:
    _split(dataset, config.data_dir, "--config.eval_split", config.eval_split)
  train = dataset.splits[config.train_split]
  if train.num_examples // config.batch_size == 0:
    raise OptionError(f"--config.batch_size={config.batch_size}: split "
                      f"{config.train_split!r} has only {train.num_examples} examples, "
                      "fewer than one batch")
  try:
    losses.create_loss(config.loss, train.positives, train.num_examples)
  except ValueError as e:
    raise OptionError(str(e)) from None
