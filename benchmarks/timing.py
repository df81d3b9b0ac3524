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


def print_step_rate(kind: str, setting: str, run_steps: Callable[[int], object],
                    batch_size: int, repeats: int, steps: int) -> None:
  """Times `run_steps` with `median_step_times` and prints the reference scripts' line:
  'KIND SETTING step_ms=... cpu_ms=... img_per_s=...' (what the comparisons parse)."""
  wall, cpu = median_step_times(run_steps, repeats, steps)
  print(f"{kind} {setting} step_ms={wall * 1e3:.1f} cpu_ms={cpu * 1e3:.1f} "
        f"img_per_s={batch_size / wall:.1f}", flush=True)
