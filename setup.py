"""Builds the optional oneDNN convolution extension, poster_cnn/onednn_conv3x3.cc.

Everything else about the package is declared in pyproject.toml. The extension is optional:
off Linux x86-64, or where it does not compile (no C++ compiler), the install goes on without
it and poster_cnn uses its XLA formulations instead (poster_cnn/onednn_conv.py says why
in `load_error()`).
"""

import importlib.metadata
import importlib.util
import pathlib
import platform
import sys

from setuptools import Extension, setup


def _installed_file(dist: str, suffix: str) -> pathlib.Path:
  """Where the installed distribution `dist` put its file whose path ends with `suffix`."""
  d = importlib.metadata.distribution(dist)
  for f in d.files or ():
    if str(f).endswith(suffix):  # RECORD paths may climb out of site-packages: ../../lib
      return pathlib.Path(d.locate_file(f)).resolve()
  raise FileNotFoundError(f"{dist} {d.version} has no file ending in {suffix}")


def _extensions() -> list[Extension]:
  if sys.platform != "linux" or platform.machine() != "x86_64":
    return []
  try:
    # Both come from pyproject.toml's [build-system] requires.
    dnnl_hpp = _installed_file("onednn-devel-cpu-gomp", "/oneapi/dnnl/dnnl.hpp")
    libdnnl = _installed_file("onednn-cpu-gomp", "/libdnnl.so")
    jaxlib = pathlib.Path(importlib.util.find_spec("jaxlib").submodule_search_locations[0])
    jaxlib_version = importlib.metadata.version("jaxlib")
  except (ImportError, FileNotFoundError, AttributeError) as e:
    print(f"poster_cnn: not building the oneDNN convolutions: {e}", file=sys.stderr)
    return []
  return [Extension(
      "poster_cnn._onednn_conv3x3",
      sources=["poster_cnn/onednn_conv3x3.cc"],
      include_dirs=[str(dnnl_hpp.parents[2]), str(jaxlib / "include")],
      library_dirs=[str(libdnnl.parent)],
      libraries=["dnnl"],
      # XLA refuses handlers built against a newer FFI than its own: onednn_conv.py checks
      # this version against the installed jaxlib before registering them.
      define_macros=[("POSTER_CNN_BUILT_WITH_JAXLIB", f'"{jaxlib_version}"')],
      # XLA's FFI headers warn under GCC (always_inline, missing returns after switches,
      # signedness).
      extra_compile_args=["-std=c++17", "-fvisibility=hidden", "-Wno-attributes",
                          "-Wno-return-type", "-Wno-sign-compare"],
      language="c++",
      optional=True,
  )]


setup(ext_modules=_extensions())
