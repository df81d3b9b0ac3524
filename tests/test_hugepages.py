"""The entry point's re-exec with transparent huge pages (poster_cnn/hugepages.py)."""

import os
import subprocess
import sys

import pytest

from poster_cnn import hugepages

_PRINT_TUNABLES = ("from poster_cnn import hugepages; hugepages.reexec_with_huge_pages(); "
                   "import os, sys; print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                          "POSTER_CNN_HUGE_PAGES")}
  return env | extra


def test_a_users_own_setting_and_the_opt_out_are_kept():
  assert not hugepages.wanted(_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))
  assert not hugepages.wanted(_env(POSTER_CNN_HUGE_PAGES="0"))


@pytest.mark.skipif(not hugepages.wanted(_env()), reason="no glibc >= 2.35 with THP here")
def test_reexecs_once_with_the_tunable_added_and_the_arguments_kept():
  out = subprocess.run(
      [sys.executable, "-c", _PRINT_TUNABLES, "--flag=1", "x y"], capture_output=True,
      text=True, check=True, timeout=60,
      env=_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4")).stdout
  # Printed once (exec replaced the first process), by the re-executed process.
  assert out == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['--flag=1', 'x y']\n"
