"""Worker processes that end with the process that started them.

A worker blocked on its queue never notices a SIGKILLed parent (the queue's pipe
stays open in the worker itself), so it would live on holding its memory. Each
worker instead watches its parent id from a daemon thread: once the parent dies
the worker is re-parented and exits. (prctl's PR_SET_PDEATHSIG would fire when the
parent *thread* that started the worker exits, and grain starts its workers from
short-lived threads.)
"""

from __future__ import annotations

import os
import threading
import time

_POLL_S = 0.5


def exit_with_parent(*_worker_index_and_count) -> None:
  """Worker initializer: exits this process soon after its parent has died.

  Arguments are ignored, so it serves as grain's `worker_init_fn(index, count)` too.
  """
  parent_pid = os.getppid()

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(_POLL_S)
    os._exit(1)  # no cleanup to run: the parent, and whatever it waited for, is gone

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()
