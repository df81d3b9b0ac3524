"""Where a grain training iterator stands, rebuilt for another process or worker count.

A checkpoint keeps each process's grain iterator state, whose layout depends on the
topology that wrote it: one file per process (`process_<i>-of-<n>.json`) and, with
input worker processes, one inner state per worker. A run resumed with another
number of processes or workers cannot load those states, but it does not need to:
every process draws one batch per training step, so after `step` steps each of them
stands `step` batches into its own stream. `state_after` writes that position in
the layout of the iterator at hand. (The pipeline batches before it reads: each
element of its stream is a batch, so positions count batches.)

What this does not keep (checkpoint.py logs it on such a resume): which examples come
next is exact only where the split's size is a multiple of both process counts
(pipeline.train_dataset drops `len % process_count` examples per epoch), and
augmentation draws differ: they are keyed by the step and drawn per row of the global
batch (poster_cnn/preprocess.py), and another process count puts the step's examples
in other rows.
"""

from __future__ import annotations

from typing import Any


def state_after(template: dict[str, Any], batches: int) -> dict[str, Any]:
  """The state of an iterator shaped like `template` after `batches` batches.

  Args:
    template: `get_state()` of a fresh iterator of the pipeline (any position works
      for the layout; only its structure is read).
    batches: batches this process has drawn.
  """
  if "next_index" in template:  # one stream of batches, read in this process
    return {**template, "next_index": batches}
  if "iterators_in_use_states" in template:  # mp_prefetch: workers take batches in turn
    inner = template["iterators_in_use_states"]
    workers = len(inner)
    return {**template, "next_index_in_cycle": batches % workers,
            "iterators_in_use_states": [
                state_after(s, -(-(batches - w) // workers))
                for w, s in enumerate(inner)]}
  raise ValueError(f"unknown grain iterator state layout (keys {sorted(template)})")


def same_layout(a: dict[str, Any], b: dict[str, Any]) -> bool:
  """Whether two iterator states come from pipelines of the same shape."""
  if sorted(a) != sorted(b):
    return False
  if "iterators_in_use_states" in a:
    return len(a["iterators_in_use_states"]) == len(b["iterators_in_use_states"])
  return True
