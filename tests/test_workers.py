"""Worker processes (grain's input workers, the converter's image workers) end when the
process that started them is SIGKILLed, instead of living on with their memory."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_GRAIN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from poster_cnn.data import pipeline
    it = iter(pipeline.train_dataset({data!r}, "train", global_batch_size=8,
                                     image=pipeline.ImageOptions(32, 32), seed=0,
                                     num_workers=1))
    next(it)
""")

_CONVERTER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from poster_cnn.data import images
    opts = images.JpegOptions(None, 95, images.DEFAULT_MAX_IMAGE_PIXELS)
    results = images.converted_images(iter([["/nonexistent.jpg"]] * 64), 64, opts, 1)
    next(results)
""")

_THEN_WAIT = textwrap.dedent("""
    print("ready", flush=True)
    import time
    time.sleep(600)
""")


def _children(pid: int) -> set[int]:
  found = set()
  for path in glob.glob(f"/proc/{pid}/task/*/children"):
    with open(path) as f:
      found.update(int(p) for p in f.read().split())
  return found


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("program", ["grain", "converter"])
def test_workers_exit_when_their_parent_is_killed(tiny_dataset, program):
  code = {"grain": _GRAIN, "converter": _CONVERTER}[program].format(repo=REPO,
                                                                    data=tiny_dataset)
  proc = subprocess.Popen([sys.executable, "-c", code + _THEN_WAIT], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert proc.stdout.readline().strip() == "ready"
    workers = _children(proc.pid)
    assert workers, "no worker process started"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  deadline = time.monotonic() + 60
  while any(_running(p) for p in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  alive = [p for p in workers if _running(p)]
  for p in alive:
    os.kill(p, signal.SIGKILL)
  assert not alive, f"worker processes {alive} outlived their parent"
