"""Step timing shared by the benchmark scripts, including the reference scripts that run in
other frameworks' environments (so: standard library only)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_step_seconds(run_steps: Callable[[int], object], repeats: int, steps: int) -> float:
  """Seconds per step: the median over `repeats` windows of `run_steps(steps)`, divided by
  `steps`. `run_steps(n)` runs n steps and waits for their results; warm it up first."""
  return median_step_times(run_steps, repeats, steps)[0]


def median_step_times(run_steps: Callable[[int], object], repeats: int,
                      steps: int) -> tuple[float, float]:
  """(wall, CPU) seconds per step, each the median over the windows of `median_step_seconds`.

  CPU time is the process's, all threads summed (idle-waiting threads that spin count too).
  On a machine shared with other work it varies less than the wall time: a step that
  waits for a core costs wall time but no CPU time.
  """
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    run_steps(steps)
    wall.append((time.perf_counter() - start) / steps)
    cpu.append((time.process_time() - start_cpu) / steps)
  return statistics.median(wall), statistics.median(cpu)
