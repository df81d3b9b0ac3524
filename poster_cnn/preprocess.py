"""Device-side preprocessing: a batch of fixed-size uint8 posters -> the model's input.

The input pipeline ships posters as uint8 at one fixed size per dataset (the size they
were stored at, or the training size; `pipeline.carrier_size`), which is the cheapest
thing a host can produce: a JPEG decode, or a copy of raw pixels. Everything else that
turns them into training inputs runs here, batched, inside the jitted step: resize
(stretch or pad), random crop, horizontal flip and colour jitter. Evaluation and
prediction call `prepare` without a key, so they see exactly the training resize
without the augmentation. Normalisation (/255) stays in the models.

Resampling is bilinear with antialiasing when shrinking, the weights of
`jax.image.scale_and_translate(method='linear')`, computed per output pixel over its few
source taps and applied by a gather (a dense weight matrix, as jax.image uses, costs
about 50x the arithmetic at 224 pixels: nothing on a GPU, several times slower on a CPU).
Crop and flip cost nothing extra: they only move the sampling positions.

Randomness comes from the key the train step passes in (derived from the state's seed
and step with `jax.random.fold_in`), so a resumed run augments bitwise alike, and it is
drawn for the whole global batch, so it does not depend on how the batch is sharded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_EPS = 1000.0 * float(jnp.finfo(jnp.float32).eps)  # as jax.image's normalisation


def augments(opts) -> bool:
  """Whether `opts` (pipeline.ImageOptions) asks for any training augmentation."""
  return bool(opts.random_crop or opts.horizontal_flip or opts.color_jitter > 0)


def _taps(in_size: int, out_size: int, scale: jax.Array, translation: jax.Array,
          num_taps: int) -> tuple[jax.Array, jax.Array]:
  """Source indices and weights of one axis' bilinear (antialiased) resampling.

  Output pixel i samples the input at sample_f = (i + 0.5 - translation) / scale - 0.5,
  with a triangle kernel widened by 1/scale when shrinking, normalised over the taps
  inside the input and zero where sample_f falls outside it: jax.image's weights.

  Returns:
    (int32 (out_size, num_taps) indices clipped into the input,
     float32 (out_size, num_taps) weights).
  """
  kernel_scale = jnp.maximum(1.0 / scale, 1.0)
  sample_f = (jnp.arange(out_size, dtype=jnp.float32) + 0.5 - translation) / scale - 0.5
  first = jnp.floor(sample_f - kernel_scale) + 1.0
  index = first[:, None] + jnp.arange(num_taps, dtype=jnp.float32)
  weight = jnp.maximum(0.0, 1.0 - jnp.abs(sample_f[:, None] - index) / kernel_scale)
  weight = jnp.where((index >= 0) & (index <= in_size - 1), weight, 0.0)
  total = weight.sum(axis=1, keepdims=True)
  weight = jnp.where(jnp.abs(total) > _EPS, weight / jnp.where(total != 0, total, 1.0), 0.0)
  inside = (sample_f >= -0.5) & (sample_f <= in_size - 0.5)
  weight = jnp.where(inside[:, None], weight, 0.0)
  return jnp.clip(index, 0, in_size - 1).astype(jnp.int32), weight


def _num_taps(in_size: int, out_size: int, max_kernel_scale: float | None = None) -> int:
  """Enough taps for every scale at least out_size / in_size (no crop larger than the
  input), so the gather has a static shape."""
  kernel_scale = max(1.0, max_kernel_scale or in_size / out_size)
  return math.ceil(2 * kernel_scale) + 1


def _resample(image: jax.Array, out_hw: tuple[int, int], scale: jax.Array,
              translation: jax.Array, flip: jax.Array, taps: tuple[int, int]) -> jax.Array:
  """One image (H, W, C) -> float32 (out_h, out_w, C); scale and translation (2,) per
  axis, as jax.image.scale_and_translate takes them; flip mirrors the output columns."""
  h, w = image.shape[:2]
  rows, row_w = _taps(h, out_hw[0], scale[0], translation[0], taps[0])
  cols, col_w = _taps(w, out_hw[1], scale[1], translation[1], taps[1])
  cols = jnp.where(flip, cols[::-1], cols)
  col_w = jnp.where(flip, col_w[::-1], col_w)
  x = image.astype(jnp.float32)
  # One gather of whole columns, then of whole rows, per tap: XLA's CPU backend runs
  # these slice gathers several times faster than one gather of (pixel, tap) pairs.
  # Columns first: the source is taller than wide, so the intermediate is smaller.
  x = sum(jnp.take(x, cols[:, k], axis=1) * col_w[None, :, k, None] for k in range(taps[1]))
  return sum(jnp.take(x, rows[:, k], axis=0) * row_w[:, k, None, None] for k in range(taps[0]))


def _boxes(rng: jax.Array, n: int, hw: tuple[int, int], min_area: float) -> jax.Array:
  """Random crop boxes float32 (n, 4) as (top, left, height, width) in source pixels,
  covering [min_area, 1] of the image with aspect (width / height) in [3/4, 4/3]."""
  h, w = hw
  area_rng, aspect_rng, pos_rng = jax.random.split(rng, 3)
  area = jax.random.uniform(area_rng, (n,), minval=min_area, maxval=1.0) * h * w
  aspect = jnp.exp(jax.random.uniform(aspect_rng, (n,), minval=math.log(3 / 4),
                                      maxval=math.log(4 / 3)))
  ch = jnp.minimum(h, jnp.sqrt(area / aspect))
  cw = jnp.minimum(w, jnp.sqrt(area * aspect))
  pos = jax.random.uniform(pos_rng, (n, 2))
  return jnp.stack([pos[:, 0] * (h - ch), pos[:, 1] * (w - cw), ch, cw], axis=1)


def _jitter(images: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
  """Random saturation, contrast and brightness per image, each by up to +-strength."""
  factors = jax.random.uniform(rng, (images.shape[0], 3, 1, 1, 1), minval=1 - strength,
                               maxval=1 + strength)
  b, c, s = factors[:, 0], factors[:, 1], factors[:, 2]
  gray = images.mean(axis=-1, keepdims=True)
  x = gray + (images - gray) * s
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * c + mean
  return jnp.clip(x * b, 0.0, 255.0)


def prepare(images: jax.Array, opts, rng: jax.Array | None = None) -> jax.Array:
  """A batch as the pipeline ships it -> the model's input, on the device (jit it).

  Args:
    images: uint8 (B, H, W, 3), every poster at the dataset's carrier size.
    opts: pipeline.ImageOptions: the output size, 'stretch' or 'pad', augmentation.
    rng: a JAX key for training augmentation; None for evaluation and prediction
      (resize only, deterministic).

  Returns:
    (B, opts.height, opts.width, 3) in [0, 255]: `images` itself (uint8) when it is
    already at the output size and nothing is to be done, else float32.
  """
  n, h, w = images.shape[:3]
  out = (opts.height, opts.width)
  augment = rng is not None and augments(opts)
  if (h, w) == out and not augment:
    return images
  crop_rng, flip_rng, jitter_rng = (jax.random.split(rng, 3) if augment else (None,) * 3)
  if augment and opts.random_crop:
    boxes = _boxes(crop_rng, n, (h, w), opts.crop_min_area)
  else:
    boxes = jnp.broadcast_to(jnp.asarray([0.0, 0.0, h, w], jnp.float32), (n, 4))
  size = boxes[:, 2:]
  scale = jnp.asarray(out, jnp.float32) / size
  if opts.resize == "pad":
    scale = jnp.broadcast_to(scale.min(axis=1, keepdims=True), scale.shape)
  # Pad: the scaled box centred in the output (stretch: fills it, offset 0).
  translation = -boxes[:, :2] * scale + (jnp.asarray(out, jnp.float32) - size * scale) / 2
  if augment and opts.horizontal_flip:
    flip = jax.random.bernoulli(flip_rng, 0.5, (n,))
  else:
    flip = jnp.zeros((n,), bool)
  if opts.resize == "pad":  # one scale for both axes, up to the larger shrink
    widest = max(h / out[0], w / out[1])
    taps = (_num_taps(h, out[0], widest), _num_taps(w, out[1], widest))
  else:
    taps = (_num_taps(h, out[0]), _num_taps(w, out[1]))
  x = jax.vmap(lambda i, s, t, f: _resample(i, out, s, t, f, taps))(images, scale,
                                                                      translation, flip)
  if augment and opts.color_jitter > 0:
    x = _jitter(x, jitter_rng, opts.color_jitter)
  return x
