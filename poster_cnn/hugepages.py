"""Transparent huge pages for the training process's heap, set by the `poster-cnn` entry point.

The paper model's CPU step allocates and frees activations of tens of MB every step; with
4 KiB pages the kernel faults each of them in again, every step. glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (madvise) instead;
the paper model's CPU train step ran 1.2x faster with it on a quiet 2-core machine
(issue 19's measurement; docs/BENCHMARKS.md). glibc reads tunables
only when a process starts, so `reexec_with_huge_pages()` re-executes the interpreter,
with the same arguments and process id, once, with the tunable added to GLIBC_TUNABLES.

It does nothing (and so costs nothing) where it cannot help: off Linux, without glibc 2.35
or newer (the first with the tunable), where the kernel's transparent huge pages are off
(`never`), where GLIBC_TUNABLES already sets `glibc.malloc.hugetlb` (a user's own choice,
`=0` included), or with POSTER_CNN_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
_OPT_OUT = "POSTER_CNN_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. 'glibc 2.36'
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):  # no confstr, or not glibc
    return None


def _thp_enabled() -> bool:
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def wanted(environ=os.environ) -> bool:
  """Whether this process should be re-executed with huge pages (see the module docstring)."""
  if environ.get(_OPT_OUT, "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return False
  return sys.platform == "linux" and (_glibc_version() or (0, 0)) >= (2, 35) and _thp_enabled()


def reexec_with_huge_pages() -> None:
  """Re-executes this Python process with `glibc.malloc.hugetlb=1`, or returns if not
  `wanted()`. Call it first thing in an entry point: nothing before it survives."""
  if not wanted():
    return
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
  os.environ["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv: the interpreter's own options and `-m module` or the script, as started.
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
