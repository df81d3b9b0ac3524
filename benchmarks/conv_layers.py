"""Where a 3x3 convolution's time goes, per layer of the paper model and per part.

For each conv layer of the paper model (224x224 input, batch 32 by default) this times,
in isolation and jitted, each part of a training step's convolution work under each
formulation poster_cnn has or has measured:

  fwd      the forward: XLA's convolution ('xla'), im2col + one matmul ('im2col') or
           oneDNN's ('onednn', where the extension is built; also under dx and dw)
  patches  building the im2col patch array alone (B, H, W, 9 Cin), and 'floor': writing
           an array of the same size with no gathering (a broadcast), the memory-write
           bound any patch-based formulation pays
  dx       the input gradient: XLA's ('xla', a convolution with the flipped kernel) or
           im2col's transpose ('col2im': dy @ kernel^T, then the 9 shifted adds)
  dw       the kernel gradient: XLA's ('xla'), patches^T @ dy ('im2col'), 9 per-tap
           matmuls on shifted copies ('taps'), or 3 matmuls on contiguous row offsets of
           column patches ('rows': only 3x the input is written; not in the model,
           because the whole step was not faster with it)

Layer 1 has no dx (its input is the image). One line per (layer, part, impl):

  conv_layer layer=2 hw=112 cin=16 cout=32 batch=32 part=dw impl=im2col ms=... rel_err_vs_first=...

    python benchmarks/conv_layers.py --batch_size=32 --repeats=5
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poster_cnn import model as model_lib, onednn_conv  # noqa: E402
from timing import median_step_seconds  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Input height and width.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure; the median is printed.")

# (Cin, Cout) of the paper model's conv layers; each halves the resolution after it.
LAYERS = ((3, 16), (16, 32), (32, 64), (64, 128))
_DW = (((0, 1, 2), (0, 1, 2)), ((), ()))  # contract batch, height, width


def _write_floor(x):
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[..., None, :] + 1, (b, h, w, 9, c)).reshape(b, h, w, 9 * c)


def _dx_xla(x, dy, kernel):
  del x
  return model_lib._conv_xla(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))


def _dx_col2im(x, dy, kernel):
  c, f = kernel.shape[2:]
  dpatches = lax.dot_general(dy, kernel.reshape(9 * c, f), (((3,), (1,)), ((), ())))
  return jax.vjp(model_lib._im2col, x)[1](dpatches)[0]


def _dw_xla(x, dy, kernel):
  return jax.vjp(lambda k: model_lib._conv_xla(x, k), kernel)[1](dy)[0]


def _dw_rows(x, dy, kernel):
  """Column patches over the padded height (3x the input), then one matmul per kernel row
  on a contiguous row range of them: rows h + i of image b, for all b at once, are the
  flat rows [i W, i W + L) when dy is padded to the same H + 2 rows."""
  del kernel
  _, _, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, :, j:j + w] for j in range(3)], -1).reshape(-1, 3 * c)
  dyp = jnp.pad(dy, ((0, 0), (0, 2), (0, 0), (0, 0))).reshape(-1, dy.shape[-1])
  n = cols.shape[0] - 2 * w
  rows = [lax.dot_general(lax.slice_in_dim(cols, i * w, i * w + n), dyp[:n],
                          (((0,), (0,)), ((), ()))) for i in range(3)]
  return jnp.stack(rows).reshape(3, 3, c, dy.shape[-1])


PARTS = {
    "fwd": {"xla": lambda x, dy, k: model_lib._conv_xla(x, k),
            "im2col": lambda x, dy, k: model_lib._conv_im2col(x, k)},
    "patches": {"im2col": lambda x, dy, k: model_lib._im2col(x),
                "floor": lambda x, dy, k: _write_floor(x)},
    "dx": {"xla": _dx_xla, "col2im": _dx_col2im},
    "dw": {"xla": _dw_xla,
           "im2col": lambda x, dy, k: model_lib._kernel_grad_im2col(x, dy),
           "taps": lambda x, dy, k: model_lib._kernel_grad_taps(x, dy),
           "rows": _dw_rows},
}
if onednn_conv.available():  # oneDNN's direct kernels through XLA's FFI (conv_impl='onednn')
  PARTS["fwd"]["onednn"] = lambda x, dy, k: onednn_conv.conv3x3(x, k)
  PARTS["dx"]["onednn"] = lambda x, dy, k: jax.vjp(lambda x: onednn_conv.conv3x3(x, k), x)[1](dy)[0]
  PARTS["dw"]["onednn"] = lambda x, dy, k: jax.vjp(lambda k: onednn_conv.conv3x3(x, k), k)[1](dy)[0]


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile
  return 1e3 * median_step_seconds(
      lambda n: [jax.block_until_ready(fn(*args)) for _ in range(n)], _REPEATS.value, 1)


def main(argv):
  del argv
  b, size = _BATCH.value, _SIZE.value
  for layer, (cin, cout) in enumerate(LAYERS, start=1):
    hw = size >> (layer - 1)
    kx, kd, kk = jax.random.split(jax.random.key(layer), 3)
    x = jax.random.normal(kx, (b, hw, hw, cin))
    dy = jax.random.normal(kd, (b, hw, hw, cout))
    kernel = jax.random.normal(kk, (3, 3, cin, cout)) * 0.1
    for part, impls in PARTS.items():
      if part == "dx" and layer == 1:
        continue
      reference = None
      for impl, fn in impls.items():
        fn = jax.jit(fn)
        ms = _median_ms(fn, x, dy, kernel)
        # Every formulation of a part computes the same array (the write floor excepted).
        out = fn(x, dy, kernel)
        reference = out if reference is None else reference
        err = ("n/a" if impl == "floor" else
               f"{float(jnp.abs(out - reference).max() / jnp.abs(reference).max()):.1e}")
        print(f"conv_layer layer={layer} hw={hw} cin={cin} cout={cout} batch={b} "
              f"part={part} impl={impl} ms={ms:.1f} rel_err_vs_first={err}", flush=True)


if __name__ == "__main__":
  app.run(main)
