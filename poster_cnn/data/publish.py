"""A directory written beside its destination and renamed into place, whole or not at all.

The converter writes a dataset into a sibling staging directory (same file system) and
renames it to the output when complete; an old output is moved aside first and deleted
only once the new one is in place. Ctrl-C and SIGTERM arriving in the few steps where an
interrupt would leave a directory behind or the output missing (creating the staging
directory, the swap, removing what is left) are held until those steps are done.
SIGKILL runs no cleanup: `clean_leftovers` removes what such a run left, on the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from absl import logging

from poster_cnn.interrupts import deferred_interrupts

# .NAME.KIND-PID-HEX, beside the output NAME: see sibling().
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|probe)-(?P<pid>\d+)-[0-9a-f]{8}")


def sibling(path: Path, kind: str) -> Path:
  """A new directory `.NAME.KIND-PID-HEX` beside `path`, with the permissions the umask
  gives (mkdtemp's 0700 would end up on the published dataset)."""
  while True:
    candidate = path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
      candidate.mkdir()
      return candidate
    except FileExistsError:
      continue


def check_writable(output_dir: Path) -> None:
  """Creates `output_dir`'s parent and a scratch directory in it. Raises OSError where the
  parent is a file, read-only or not a real file system (/proc)."""
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  with deferred_interrupts():
    sibling(output_dir, "probe").rmdir()


class Staging:
  """The staging directory of one output: `path` while writing, then `publish()`."""

  def __init__(self, output_dir: Path):
    self.output_dir = output_dir
    self.path: Path | None = None
    self.published = False

  def publish(self) -> None:
    """Renames the staging directory to the output, replacing an old output only once the
    new one is in place; an interrupt during the swap is delivered after it."""
    with deferred_interrupts():
      out, old = self.output_dir, None
      if out.exists():
        old = sibling(out, "old")
        os.rename(out, old / out.name)
      try:
        os.rename(self.path, out)
      except BaseException:
        if old is not None:
          os.rename(old / out.name, out)
        raise
      self.published = True
      if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging(output_dir: Path) -> Iterator[Staging]:
  """A Staging whose directory exists for the block and is removed when the block ends
  unpublished, however it ends (an exception, Ctrl-C, SIGTERM)."""
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  stage = Staging(output_dir)
  try:
    with deferred_interrupts():  # no interrupt between the mkdir and knowing its name
      stage.path = sibling(output_dir, "tmp")
    yield stage
  finally:
    if stage.path is not None and not stage.published:
      with deferred_interrupts():
        shutil.rmtree(stage.path, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def clean_leftovers(output_dir: Path) -> None:
  """Removes what a killed conversion to `output_dir` left beside it (SIGKILL runs no
  cleanup): partial new datasets, and old ones moved aside for the swap; an old one is
  moved back when the swap was cut short before the new one took its place. Siblings
  of a conversion still running (its process alive) are left alone."""
  try:
    siblings = list(output_dir.parent.iterdir())
  except OSError:
    return
  for path in siblings:
    m = _LEFTOVER.fullmatch(path.name)
    if not m or m["name"] != output_dir.name or _alive(int(m["pid"])):
      continue
    old = path / output_dir.name
    if m["kind"] == "old" and old.is_dir() and not output_dir.exists():
      os.rename(old, output_dir)
      logging.warning("restored %s from %s, where an interrupted --overwrite had moved it",
                      output_dir, path)
    shutil.rmtree(path, ignore_errors=True)
    logging.warning("removed %s, left by an interrupted conversion (process %s)", path,
                    m["pid"])
