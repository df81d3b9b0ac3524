"""A checkpoints/ directory deleted under a running job, told apart and kept quiet.

`rm -rf WORKDIR/checkpoints` during a run must cost the checkpoints it held, not the
run: `checkpoint.save` and `finish` ask `lost()` whether an error is that of a save whose
directory went, and the next save recreates it. This module holds how that is told (a
marker file, since tensorstore may recreate the directory itself) and keeps the noise
orbax, asyncio and tensorstore make about it (tracebacks from writer threads, unretrieved
task exceptions, callbacks into closed event loops) to one warning.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys

import jax

from poster_cnn import storage


# Written into a local checkpoints/ directory when the run opens it. tensorstore recreates
# the directories of an array it is writing, so a checkpoints/ deleted under a save can be
# back a moment later, holding only the remains of that save: the marker is what tells the
# run's own directory from such a one.
MARKER = ".poster_cnn"


def deleted(directory: str) -> bool:
  """Whether the local checkpoints/ `directory` opened by this run has been deleted (and
  perhaps recreated without the marker). Object storage has no directories to delete: a
  remote one never is."""
  return not storage.is_remote(directory) and not os.path.exists(
      os.path.join(directory, MARKER))


def mark(directory: str) -> None:
  """Writes the marker into the local checkpoints/ `directory` (on process 0)."""
  if not storage.is_remote(directory) and jax.process_index() == 0:
    with open(os.path.join(directory, MARKER), "w") as f:
      f.write("the checkpoints of a poster_cnn run; training recreates the directory "
              "when this file disappears\n")


def _lost(directory: str, error: BaseException) -> bool:
  """Whether `error` is that of a save into `directory` deleted under it (rm -rf
  WORKDIR/checkpoints). Locally the missing marker says so, whatever orbax raised: a
  FileNotFoundError, or a ValueError about the metadata of arrays deleted after being
  written. Remotely, a FileNotFoundError under it."""
  if deleted(directory):
    return True
  while error is not None and not isinstance(error, FileNotFoundError):
    error = error.__cause__ or error.__context__
  return error is not None and str(error.filename or "").startswith(directory + os.sep)


class _LostSaves(pylogging.Filter):
  """Keeps a save whose checkpoints/ directory was deleted under it to the warnings of
  finish() and save(): shortens to one line what orbax's writer threads log, with a
  traceback, about it, and drops the "Task exception was never retrieved" that asyncio
  logs for each of its array writes left behind."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()
    self.any_lost = False

  def lost(self, error: BaseException, directories=None) -> bool:
    """Whether `error` is that of a save into one of `directories` (by default, the
    watched ones) deleted under it."""
    lost = any(_lost(d, error) for d in directories or self.directories)
    self.any_lost |= lost
    return lost

  def filter(self, record) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and record.name == "asyncio":
      # Logged when the task is collected, perhaps after the directory was recreated.
      return not (self.lost(error) or self.any_lost and any(
          d + os.sep in str(error) for d in self.directories))
    if error is not None and self.lost(error):
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = "a checkpoint lost its directory: %s", (first_line(error),)
      record.levelno, record.levelname = pylogging.WARNING, "WARNING"
    return True


def ignore_closed_event_loops() -> None:
  """Makes `sys.unraisablehook` drop the "Event loop is closed" errors of tensorstore
  callbacks that arrive after orbax stopped waiting: when a read or write of a
  checkpoint fails (a damaged file, a directory deleted under a save), orbax raises and
  closes that operation's event loop while tensorstore is still completing its other
  reads and writes. The failure itself is raised and reported where it is caught."""
  previous = sys.unraisablehook
  if getattr(previous, "poster_cnn", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.poster_cnn = True
  sys.unraisablehook = hook


_FILTER = _LostSaves()
pylogging.getLogger("absl").addFilter(_FILTER)
pylogging.getLogger("asyncio").addFilter(_FILTER)


def watch(directory: str) -> None:
  """Marks the checkpoints/ `directory` a run opened for writing, and has the log filter
  watch it."""
  mark(directory)
  _FILTER.directories.add(directory)


def lost(error: BaseException, directory: str) -> bool:
  """Whether `error` is that of a save into `directory` deleted under it; once one
  was, asyncio's later reports of that save's writes are dropped too."""
  return _FILTER.lost(error, [directory])


def first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


@contextlib.contextmanager
def quiet_event_loop():
  """Drops the "Event loop is closed" errors that orbax's aborted reads of a damaged
  checkpoint log from their leftover coroutines; the failure itself is raised."""
  class _Filter(pylogging.Filter):
    def filter(self, record):
      text = record.getMessage()
      if record.exc_info and record.exc_info[1] is not None:
        text += str(record.exc_info[1])
      return "Event loop is closed" not in text

  f = _Filter()
  loggers = [pylogging.getLogger(), pylogging.getLogger("asyncio"), pylogging.getLogger("absl")]
  for logger in loggers:
    logger.addFilter(f)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(f)
