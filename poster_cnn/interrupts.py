"""Ctrl-C and SIGTERM held back over steps that must not be cut in half.

Python raises KeyboardInterrupt (and the converter's Terminated) between any two
bytecodes: inside a rename pair, between a mkdir and binding its name, or in the middle
of writing a spawned worker's start-up data to its pipe (the worker then dies printing
`EOFError: Ran out of input`). `deferred_interrupts()` holds the signals over such a step
and delivers them right after it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deferred_interrupts(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
                        ) -> Iterator[None]:
  """Holds `signums` until the block ends, then delivers them again, so that their handlers
  (KeyboardInterrupt, the converter's Terminated) raise after the block, not inside it.

  Python runs signal handlers in the main thread only: elsewhere this holds nothing (and
  needs not). A signal whose handler was not installed from Python is left alone.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received: list[int] = []
  previous = {s: h for s in signums if (h := signal.getsignal(s)) is not None}
  for s in previous:
    signal.signal(s, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for s in dict.fromkeys(received):
      signal.raise_signal(s)  # the restored handler runs before the next line of Python
