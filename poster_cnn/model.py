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
Dropout keeps with probability 1 - rate rounded to a multiple of 2**-16
(`poster_cnn.dropout`: a quarter of the random hashing of nn.Dropout's).
`PosterResNet` is a small ResNet with global average pooling, the better model
on real posters (docs/RESULTS.md).

Models take uint8 images and normalise them on the device, so the host ships
a quarter of the bytes and the scaling fuses into the first convolution.
They return logits; BatchNorm statistics live in the 'batch_stats'
collection and are only updated when `train=True`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from poster_cnn import dropout, efficientnet, onednn_conv

Dtype = Any

# ---------------------------------------------------------------- 3x3 'SAME' convolutions
#
# XLA's CPU convolutions are slow for this network's thin layers, above all the
# kernel gradient (a reduction over batch x height x width into a tiny 3x3xCinxCout
# array). These formulations compute exactly what nn.Conv(features, (3, 3),
# padding='SAME') computes, from the same (3, 3, Cin, Cout) kernel, with matmuls.

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_xla(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)


def _im2col(x):
  """(B, H, W, C) -> (B, H, W, 9C): the 3x3 neighbourhood of each pixel, zero padded,
  taps ordered as the kernel's (row, column, channel) flattening."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)


def _conv_im2col(x, kernel):
  c, f = kernel.shape[2:]
  return lax.dot_general(_im2col(x), kernel.reshape(9 * c, f), (((3,), (0,)), ((), ())))


def _kernel_grad_im2col(x, dy):
  c, f = x.shape[-1], dy.shape[-1]
  return lax.dot_general(_im2col(x), dy, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(3, 3, c, f)


def _kernel_grad_taps(x, dy):
  _, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [lax.dot_general(xp[:, i:i + h, j:j + w], dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
          for i in range(3) for j in range(3)]
  return jnp.stack(taps).reshape(3, 3, c, dy.shape[-1])


def _xla_forward_with(kernel_grad):
  """XLA's convolution forward and input gradient, `kernel_grad` for the kernel gradient."""

  @jax.custom_vjp
  def conv(x, kernel):
    return _conv_xla(x, kernel)

  def fwd(x, kernel):
    return _conv_xla(x, kernel), (x, kernel)

  def bwd(res, dy):
    x, kernel = res
    # SAME 3x3 stride 1: the input gradient is the convolution with the flipped,
    # in/out-swapped kernel.
    dx = _conv_xla(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    return dx, kernel_grad(x, dy).astype(kernel.dtype)

  conv.defvjp(fwd, bwd)
  return conv


CONV_IMPLS = {
    "xla": _conv_xla,  # what nn.Conv runs
    "im2col": _conv_im2col,  # one (BHW, 9Cin) x (9Cin, Cout) dot; autodiff backward
    "xla_wgrad_im2col": _xla_forward_with(_kernel_grad_im2col),
    "xla_wgrad_taps": _xla_forward_with(_kernel_grad_taps),
    "onednn": onednn_conv.conv3x3,  # oneDNN's direct kernels via XLA's FFI; CPU, float32
}


def resolve_conv_impl(impl: str, backend: str | None = None, dtype: Dtype = jnp.float32) -> str:
  """'auto' -> the fastest formulation measured on `backend` (default: JAX's) for `dtype`.

  On CPU 'onednn' trains the paper model about 1.7x faster than 'im2col', and 'im2col'
  about 1.4x faster than XLA's convolution (docs/BENCHMARKS.md). 'onednn' needs the
  extension built at install time and float32; without them 'im2col'. On GPU and TPU the
  vendor convolutions win, so nn.Conv itself.
  """
  if impl != "auto":
    return impl
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  if jnp.dtype(dtype) == jnp.float32 and onednn_conv.available():
    return "onednn"
  return "im2col"


# ---------------------------------------------------------------- 2x2 max pooling
#
# nn.max_pool's gradient is XLA's select-and-scatter, which is slow on CPU: 258 ms
# against 39 ms here for the paper model's first pooling layer (224x224, batch 32).
# Pooling over the four strided quadrants instead, with a gradient written as
# elementwise selects, gives the same values and bitwise the same gradient (ties go
# to the first element of the window in row-major order, as select-and-scatter
# does) in a few fused loops; the paper model trains 1.22x faster on CPU
# (docs/BENCHMARKS.md).


def _quadrants(x):
  """(B, H, W, C) -> four (B, H//2, W//2, C) views: window elements (0,0), (0,1), (1,0), (1,1).
  An odd last row or column is dropped, as 'VALID' pooling does."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """nn.max_pool(x, (2, 2), strides=(2, 2)): (B, H, W, C) -> (B, H//2, W//2, C), any float dtype."""
  with jax.named_scope("max_pool_2x2"):  # names its ops in profiles (benchmarks/step_profile.py)
    a, b, c, d = _quadrants(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_bwd(res, g):
  with jax.named_scope("max_pool_2x2"):
    return _max_pool_grad(*res, g)


def _max_pool_grad(x, y, g):
  a, b, c, d = _quadrants(x)
  first = a == y
  second = (b == y) & ~first
  third = (c == y) & ~(first | second)
  fourth = ~(first | second | third)
  zero = jnp.zeros_like(g)
  ga, gb, gc, gd = (jnp.where(m, g, zero) for m in (first, second, third, fourth))
  n, h2, w2, ch = g.shape
  # Interleave the quadrants back: (B, H/2, 2, W/2, 2, C) -> (B, H, W, C).
  dx = jnp.stack([jnp.stack([ga, gb], 3), jnp.stack([gc, gd], 3)], 2)
  dx = dx.reshape(n, 2 * h2, 2 * w2, ch)
  h, w = x.shape[1:3]
  if (h, w) != (2 * h2, 2 * w2):
    dx = jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
  return (dx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3), padding='SAME') with a choice of formulation, and ReLU after
  the bias with `relu`.

  Same parameters ('kernel' (3, 3, Cin, Cout) lecun-normal, 'bias' zeros, float32),
  so checkpoints and initial values are interchangeable with nn.Conv's. With `relu` and
  impl 'onednn', bias and ReLU run inside oneDNN's convolution (one pass fewer over the
  output, and the bias gradient reduced in the kernel gradient's pass).
  """

  features: int
  impl: str = "xla"
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  relu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.impl not in CONV_IMPLS:
      raise ValueError(f"unknown conv impl {self.impl!r}; known: {sorted(CONV_IMPLS)}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)  # None stays
    if self.relu and bias is not None and self.impl == "onednn":
      return onednn_conv.conv3x3_bias_relu(x, kernel, bias)
    y = CONV_IMPLS[self.impl](x, kernel)
    y = y if bias is None else y + bias
    return nn.relu(y) if self.relu else y


def conv3x3(features: int, impl: str, dtype: Dtype, use_bias: bool = True,
            name: str | None = None, relu: bool = False) -> nn.Module:
  """A 3x3 'SAME' convolution, then ReLU with `relu`: nn.Conv itself for impl 'xla' without
  ReLU, else `Conv3x3` with the same parameters. Give it a name so checkpoints do not depend
  on the impl."""
  if impl == "xla" and not relu:
    return nn.Conv(features, (3, 3), padding="SAME", use_bias=use_bias, dtype=dtype, name=name)
  return Conv3x3(features, impl, dtype, use_bias, relu, name=name)


def max_pool(impl: str):
  """The 2x2 max pooling that goes with conv impl `impl`: oneDNN's with 'onednn' (the same
  values and gradient from one pass each way, its backward keeping one byte per output
  instead of the input and output), else `max_pool_2x2`."""
  if impl == "onednn":
    return onednn_conv.max_pool_2x2
  return max_pool_2x2


def batch_norm(train: bool, momentum: float, epsilon: float, dtype: Dtype):
  """nn.BatchNorm with a model's settings; call it with any further BatchNorm fields."""
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                           epsilon=epsilon, dtype=dtype)


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
  conv_impl: str = "xla"  # a key of CONV_IMPLS; 'xla' is nn.Conv itself

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """uint8 or float (batch, height, width, 3) in [0, 255] -> float32 logits (batch, num_classes)."""
    if len(self.conv_dropout) != len(self.conv_features):
      raise ValueError("conv_dropout needs one rate per conv block")
    x = images.astype(self.dtype) / 255.0
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    pool = max_pool(self.conv_impl)
    for i, (features, rate) in enumerate(zip(self.conv_features, self.conv_dropout)):
      # Conv_i: the names nn.Conv gets by default, as in checkpoints written before `impl`.
      x = conv3x3(features, self.conv_impl, self.dtype, name=f"Conv_{i}", relu=True)(x)
      x = norm()(x)
      x = pool(x)
      if rate:
        x = dropout.Dropout(rate, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    for features in self.dense_features:
      x = nn.relu(nn.Dense(features, dtype=self.dtype)(x))
      x = norm()(x)
      x = dropout.Dropout(self.dense_dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


class ResidualBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

  features: int
  norm: Any  # batch_norm(...): (**BatchNorm fields) -> a BatchNorm module
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda name: conv3x3(self.features, self.conv_impl, self.dtype, False, name)
    y = nn.relu(self.norm()(conv("conv1")(x)))
    # The residual branch starts at zero: each block begins as the identity.
    y = self.norm(scale_init=nn.initializers.zeros_init())(conv("conv2")(y))
    if x.shape[-1] != self.features:
      x = self.norm()(nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                               name="projection")(x))
    return nn.relu(x + y)


class PosterResNet(nn.Module):
  """A small ResNet for posters: a 3x3 stem, then per stage a 2x2 max pool and residual
  blocks, global average pooling, dropout and a linear head.

  Downsampling by pooling (not strided convolutions) keeps every convolution a 3x3
  'SAME' one, so the fast CPU formulations of `Conv3x3` apply to all of them. Global
  average pooling replaces the paper's 3.2M-parameter flatten-and-dense head.
  """

  num_classes: int = 13
  stem_features: int = 16
  stage_features: Sequence[int] = (32, 64, 128, 256)
  blocks_per_stage: Sequence[int] = (1, 1, 1, 1)
  head_dropout: float = 0.2
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """uint8 or float (batch, height, width, 3) in [0, 255] -> float32 logits (batch, num_classes)."""
    if len(self.blocks_per_stage) != len(self.stage_features):
      raise ValueError("blocks_per_stage needs one count per stage")
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    x = images.astype(self.dtype) / 255.0
    x = conv3x3(self.stem_features, self.conv_impl, self.dtype, False, "stem")(x)
    x = nn.relu(norm()(x))
    pool = max_pool(self.conv_impl)
    for features, blocks in zip(self.stage_features, self.blocks_per_stage):
      x = pool(x)
      for _ in range(blocks):
        x = ResidualBlock(features, norm, self.conv_impl, self.dtype)(x)
    x = x.mean(axis=(1, 2))
    x = dropout.Dropout(self.head_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def from_config(cls: type[nn.Module], section, **fixed) -> nn.Module:
  """`cls` built from the config section's fields of the same names (lists as tuples), the
  module's defaults for fields the section lacks (configs of older runs), then `fixed`."""
  names = {f.name for f in dataclasses.fields(cls)} - {"name", "parent"} - set(fixed)
  values = {k: tuple(v) if isinstance(v, list | tuple) else v
            for k, v in section.items() if k in names}
  return cls(**values, **fixed)


def create_model(config, num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  """The model a config's `model` section names."""
  m = config.model
  conv_impl = resolve_conv_impl(m.get("conv_impl", "auto"), dtype=dtype)
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"unknown --config.model.conv_impl={conv_impl!r}; known: 'auto', "
                     f"{', '.join(map(repr, CONV_IMPLS))}")
  if conv_impl == "onednn":
    if (backend := jax.default_backend()) != "cpu":
      raise ValueError(f"--config.model.conv_impl=onednn runs on the CPU, not {backend}; "
                       "use 'auto' or 'xla'")
    if error := onednn_conv.load_error():
      raise ValueError(f"--config.model.conv_impl=onednn is unavailable here ({error}); "
                       "use 'auto' or 'im2col'")
    if jnp.dtype(dtype) != jnp.float32:
      raise ValueError(f"--config.model.conv_impl=onednn computes in float32, not "
                       f"--config.dtype={jnp.dtype(dtype).name}; use 'auto' or 'im2col'")
  common = dict(num_classes=num_classes, dtype=dtype, conv_impl=conv_impl)
  if m.name == "paper_cnn":
    return from_config(PosterCNN, m, **common)
  if m.name == "resnet":
    return from_config(PosterResNet, m, **common)
  if m.name == "efficientnet_lite0":
    # Built field by field: the section's stem_features etc. are the ResNet's, not its.
    # Its convolutions are strided or depthwise: conv_impl does not apply.
    return efficientnet.EfficientNetLite(
        num_classes=num_classes, head_dropout=m.head_dropout,
        drop_connect_rate=m.get("drop_connect_rate", 0.2), bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon, dtype=dtype,
        depthwise_impl=efficientnet.resolve_depthwise_impl(m.get("depthwise_impl", "auto")),
        # A frozen backbone needs no gradient: skip its backward pass (optimizer.py zeroes
        # its updates either way).
        stop_backbone_gradient=bool(config.optimizer.get("freeze_backbone", False)))
  raise ValueError(f"unknown --config.model.name={m.name!r}; known: 'paper_cnn', 'resnet', "
                   "'efficientnet_lite0'")
