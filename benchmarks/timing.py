"""Step timing shared by the benchmark scripts, including the reference scripts that run in
other frameworks' environments (so: standard library only)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_step_seconds(run_steps: Callable[[int], object], repeats: int, steps: int) -> float:
  """Seconds per step: the median over `repeats` windows of `run_steps(steps)`, divided by
  `steps`. `run_steps(n)` runs n steps and waits for their results; warm it up first."""
  windows = []
  for _ in range(repeats):
    start = time.perf_counter()
    run_steps(steps)
    windows.append((time.perf_counter() - start) / steps)
  return statistics.median(windows)
