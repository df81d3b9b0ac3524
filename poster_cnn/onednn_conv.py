"""3x3 'SAME' float32 convolutions and 2x2 max pooling on the CPU through oneDNN, as XLA
custom calls.

XLA's CPU convolutions, and every formulation of them as matmuls, spend most of the
paper model's CPU train step; oneDNN's direct kernels do the same work about 3x faster
(docs/BENCHMARKS.md). `conv3x3` calls three handlers compiled from onednn_conv3x3.cc at
install time (forward, input gradient, kernel gradient) through `jax.ffi`, with a custom
VJP, so it drops into `jax.jit`, `jax.grad` and the train step like any JAX function, on
one device or, traced under a mesh, on each device's slice of the batch.
`conv3x3_bias_relu` is the same convolution with the bias and ReLU fused in, and
`max_pool_2x2` oneDNN's max pooling with the same values and gradient as
`model.max_pool_2x2`.

The extension is optional: where it was not built (no C++ compiler at install time, not
Linux x86-64), oneDNN cannot be loaded, or it was built against a newer jaxlib than the
installed one, `available()` is False, `load_error()` says why,
and `conv_impl='auto'` falls back to 'im2col'.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata

import jax
import jax.numpy as jnp
import jaxlib

_TARGETS = {part: f"poster_cnn_conv3x3_{part}"
            for part in ("forward", "backward_data", "backward_weights", "bias_relu_forward",
                         "backward_weights_bias")}
_TARGETS |= {part: f"poster_cnn_{part}" for part in ("max_pool2x2_forward",
                                                     "max_pool2x2_backward")}
_ONEDNN_DIST = "onednn-cpu-gomp"


def _load_libdnnl() -> None:
  # The onednn wheel installs libdnnl.so.3 under <prefix>/lib, outside the dynamic loader's
  # search path. Loading it by path first, globally, lets the extension's dependency on it
  # (by soname) resolve to the already loaded library.
  dist = importlib.metadata.distribution(_ONEDNN_DIST)
  for f in dist.files or ():
    if f.name == "libdnnl.so.3":
      ctypes.CDLL(str(dist.locate_file(f)), mode=ctypes.RTLD_GLOBAL)
      return
  raise OSError(f"{_ONEDNN_DIST} {dist.version} holds no lib/libdnnl.so.3")


@functools.cache
def load_error() -> str | None:
  """None once the oneDNN handlers are registered with XLA's CPU backend, else why not."""
  try:
    _load_libdnnl()
    ext = importlib.import_module("poster_cnn._onednn_conv3x3")
  except (ImportError, OSError) as e:  # PackageNotFoundError is an ImportError
    return f"{type(e).__name__}: {e}"
  if error := _jaxlib_mismatch(getattr(ext, "built_with_jaxlib", "unknown"), jaxlib.__version__):
    return error
  for part, target in _TARGETS.items():
    jax.ffi.register_ffi_target(target, getattr(ext, part), platform="cpu")
  return None


def _minor(version: str) -> tuple[int, ...]:
  return tuple(int(v) for v in version.split(".")[:2])


def _jaxlib_mismatch(built: str, installed: str) -> str | None:
  """Why handlers built against jaxlib `built` cannot run on jaxlib `installed`, or None.

  XLA's FFI accepts handlers built against its own or an older API version, and fails
  its whole CPU backend at start-up on a newer one (measured: built with jaxlib 0.10's
  headers, run on 0.8), so a newer build is refused here, before registering.
  """
  try:
    newer = _minor(built) > _minor(installed)
  except ValueError:  # 'unknown': built outside setup.py
    return None
  if newer:
    return (f"the extension was built against jaxlib {built}, newer than the installed "
            f"{installed}; reinstall poster_cnn to rebuild it")
  return None


def available() -> bool:
  """Whether `conv3x3` can run here."""
  return load_error() is None


def _call(part: str, *args_then_shape, dtypes=(jnp.float32,)):
  """The handler `part` on `args`; the last argument is the result's shape, or a tuple of
  the results' shapes (then `dtypes` has one dtype per result)."""
  *args, shape = args_then_shape
  if isinstance(shape[0], tuple):  # several results
    out = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shape, dtypes * len(shape) if
                                                      len(dtypes) == 1 else dtypes)]
  else:
    out = jax.ShapeDtypeStruct(tuple(shape), dtypes[0])
  return jax.ffi.ffi_call(_TARGETS[part], out)(*args)


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """lax.conv_general_dilated(x, kernel, (1, 1), 'SAME') for NHWC x and HWIO kernel.

  Traced under a mesh of several devices (`jax.sharding.use_abstract_mesh`, as
  train.jit_steps does), each device convolves its own slice of the batch, which is split
  over every mesh axis (poster_cnn's meshes are data parallel), and the kernel gradient is
  summed over them. XLA cannot split a custom call by itself: without the mesh it gathers
  the whole batch onto every device first.

  Args:
    x: (B, H, W, C) float32; B divisible by the mesh's size.
    kernel: (3, 3, C, K) float32.
  Returns:
    (B, H, W, K) float32.
  """
  return _per_device(_conv3x3, x, kernel)


def conv3x3_bias_relu(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """relu(conv3x3(x, kernel) + bias) in one oneDNN pass (bias and ReLU as a post-op).

  The backward masks dy with the output (> 0, as jax.nn.relu's gradient) and reduces the
  bias gradient in the kernel gradient's pass. Meshes as `conv3x3`.

  Args:
    x: (B, H, W, C) float32.
    kernel: (3, 3, C, K) float32.
    bias: (K,) float32.
  Returns:
    (B, H, W, K) float32, >= 0.
  """
  return _per_device(_conv3x3_bias_relu, x, kernel, bias)


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """model.max_pool_2x2 through oneDNN: the same values and gradient (ties go to the first
  element of the window in row-major order), and the backward keeps one byte per output
  (the window's argmax) instead of the input and output. Meshes as `conv3x3`.

  Args:
    x: (B, H, W, C) float32, H and W >= 2; an odd last row or column is left out.
  Returns:
    (B, H // 2, W // 2, C) float32.
  """
  with jax.named_scope("max_pool_2x2"):  # as model.max_pool_2x2's, for profiles
    return _per_device(_max_pool_2x2, x)


def _per_device(f, x, *replicated):
  """f(x, *replicated), on each device's slice of the batch when traced under a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return f(x, *replicated)
  batch = jax.P(mesh.axis_names)
  # check_vma=False: custom calls carry no varying-axes information. shard_map's transpose
  # sums the replicated arguments' gradients (kernel, bias) over the mesh.
  return jax.shard_map(f, mesh=mesh, in_specs=(batch,) + (jax.P(),) * len(replicated),
                       out_specs=batch, check_vma=False)(x, *replicated)


@jax.custom_vjp
def _conv3x3(x, kernel):
  return _forward(x, kernel)


def _check(x, kernel):
  if error := load_error():
    raise RuntimeError(f"the oneDNN convolution is unavailable: {error}")
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"the oneDNN convolution computes in float32, got {x.dtype} and "
                    f"{kernel.dtype}")
  if kernel.shape[:3] != (3, 3, x.shape[-1]):
    raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape}: expected "
                     f"(3, 3, {x.shape[-1]}, K)")


def _forward(x, kernel):
  _check(x, kernel)
  return _call("forward", x, kernel, (*x.shape[:3], kernel.shape[3]))


def _conv3x3_fwd(x, kernel):
  return _forward(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, dy):
  x, kernel = residuals
  return (_call("backward_data", dy, kernel, x.shape),
          _call("backward_weights", x, dy, kernel.shape))


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@jax.custom_vjp
def _conv3x3_bias_relu(x, kernel, bias):
  return _bias_relu_forward(x, kernel, bias)


def _bias_relu_forward(x, kernel, bias):
  _check(x, kernel)
  if bias.dtype != jnp.float32 or bias.shape != kernel.shape[3:]:
    raise ValueError(f"bias {bias.shape} {bias.dtype} does not fit kernel {kernel.shape}: "
                     f"expected ({kernel.shape[3]},) float32")
  return _call("bias_relu_forward", x, kernel, bias, (*x.shape[:3], kernel.shape[3]))


def _conv3x3_bias_relu_fwd(x, kernel, bias):
  y = _bias_relu_forward(x, kernel, bias)
  return y, (x, kernel, y)


def _conv3x3_bias_relu_bwd(residuals, dy):
  x, kernel, y = residuals
  dy = jnp.where(y > 0, dy, 0)  # fuses into the XLA loop that produced dy
  dkernel, dbias = _call("backward_weights_bias", x, dy, (kernel.shape, kernel.shape[3:]))
  return _call("backward_data", dy, kernel, x.shape), dkernel, dbias


_conv3x3_bias_relu.defvjp(_conv3x3_bias_relu_fwd, _conv3x3_bias_relu_bwd)


@jax.custom_vjp
def _max_pool_2x2(x):
  return _pool_forward(x)[0]


def _pool_forward(x):
  if error := load_error():
    raise RuntimeError(f"oneDNN's max pooling is unavailable: {error}")
  if x.dtype != jnp.float32 or x.ndim != 4 or min(x.shape[1:3]) < 2:
    raise ValueError(f"oneDNN's max pooling takes float32 (B, H, W, C) with H, W >= 2, got "
                     f"{x.dtype} {x.shape}")
  b, h, w, c = x.shape
  out = (b, h // 2, w // 2, c)
  return _call("max_pool2x2_forward", x, (out, out), dtypes=(jnp.float32, jnp.uint8))


def _max_pool_2x2_fwd(x):
  y, argmax = _pool_forward(x)
  return y, (argmax, x.shape)


def _max_pool_2x2_bwd(residuals, dy):
  argmax, shape = residuals
  return (_call("max_pool2x2_backward", dy, argmax, shape),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)
