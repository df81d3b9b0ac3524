"""Flax linen models for poster genre classification.

`PosterCNN` with its default fields is the seed paper's network exactly:

    input 224x224x3 scaled to [0, 1]
    Conv3x3-16  (ReLU) -> BatchNorm -> MaxPool 2x2 -> Dropout 0.1
    Conv3x3-32  (ReLU) -> BatchNorm -> MaxPool 2x2
    Conv3x3-64  (ReLU) -> BatchNorm -> MaxPool 2x2 -> Dropout 0.2
    Conv3x3-128 (ReLU) -> BatchNorm -> MaxPool 2x2
    Flatten -> [Dense 128 (ReLU) -> BatchNorm -> Dropout 0.5] x 2
    Dense num_classes (sigmoid applied by the loss / at prediction)

3,328,013 trainable parameters with 13 outputs at 224x224 ('same' padding;
BatchNorm momentum 0.99 and epsilon 1e-3 as in Keras, where it was built).

Models take uint8 images and normalise them on the device, so the host ships
a quarter of the bytes and the scaling fuses into the first convolution.
They return logits; BatchNorm statistics live in the 'batch_stats'
collection and are only updated when `train=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class PosterCNN(nn.Module):
  """The seed paper's CNN; every field defaults to the paper."""

  num_classes: int = 13
  conv_features: Sequence[int] = (16, 32, 64, 128)
  conv_dropout: Sequence[float] = (0.1, 0.0, 0.2, 0.0)
  dense_features: Sequence[int] = (128, 128)
  dense_dropout: float = 0.5
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32  # computation dtype; params stay float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """uint8 or float (batch, height, width, 3) in [0, 255] -> float32 logits (batch, num_classes)."""
    if len(self.conv_dropout) != len(self.conv_features):
      raise ValueError("conv_dropout needs one rate per conv block")
    x = images.astype(self.dtype) / 255.0
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=self.bn_epsilon, dtype=self.dtype)
    for features, rate in zip(self.conv_features, self.conv_dropout):
      x = nn.relu(nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype)(x))
      x = norm()(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      if rate:
        x = nn.Dropout(rate, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    for features in self.dense_features:
      x = nn.relu(nn.Dense(features, dtype=self.dtype)(x))
      x = norm()(x)
      x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


def create_model(config, num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  """The model a config's `model` section names."""
  m = config.model
  if m.name == "paper_cnn":
    return PosterCNN(num_classes=num_classes, conv_features=tuple(m.conv_features),
                     conv_dropout=tuple(m.conv_dropout),
                     dense_features=tuple(m.dense_features),
                     dense_dropout=m.dense_dropout, bn_momentum=m.bn_momentum,
                     bn_epsilon=m.bn_epsilon, dtype=dtype)
  raise ValueError(f"unknown --config.model.name={m.name!r}; known: 'paper_cnn'")
