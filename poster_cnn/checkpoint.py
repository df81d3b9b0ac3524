"""orbax checkpoints of the train state together with the grain iterator.

Layout of `<workdir>/checkpoints/<step>/`:
  state/      the TrainState (params, batch_stats, opt_state, step, rng; ema when kept)
  data_iter/  the grain iterator's position (per process)
  metrics/    validation metrics, when the step was evaluated

Saving both in one step directory is what makes a resumed run continue
with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

BEST_METRIC = "macro_map"


def _best_fn(metrics: dict) -> float:
  return float(metrics[BEST_METRIC])


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def create_manager(workdir: str | os.PathLike, *, keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the latest `keep` checkpoints and the best by macro mAP.

  Saves are asynchronous: training continues while the previous step is
  written; `wait_until_finished()` before exit.
  """
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=_best_fn, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_fn, best_mode="max", preservation_policy=policy,
      enable_async_checkpointing=not read_only, read_only=read_only,
      create=not read_only, save_interval_steps=0 if read_only else 1)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data_iter": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iter: grain.DatasetIterator | None, metrics: dict | None = None,
         *, force: bool = True) -> bool:
  """Starts saving `state` (and the iterator's position) at `step`."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items),
                      metrics=metrics, force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: grain.DatasetIterator | None = None) -> Any:
  """Restores the state at `step` into `abstract_state`'s shapes and shardings.

  `data_iter`, if given, is moved to the saved position in place.
  """
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: grain.DatasetIterator | None = None
                   ) -> tuple[int | None, Any]:
  """The newest checkpoint that restores; older ones are tried if it is broken.

  A preempted or killed run can leave a partial or corrupt latest step;
  training then resumes from the one before it, with a warning. Broken steps
  are moved to `<workdir>/checkpoints_broken/` (kept for inspection, and out
  of the way of the step numbers training will save again).

  Returns:
    (step, state), or (None, None) when there is no checkpoint.
  """
  broken = []
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return step, restore(manager, step, abstract_state, data_iter)
      except Exception as e:  # orbax raises many types for unreadable data.
        logging.warning("checkpoint at step %d in %s could not be restored (%r); "
                        "trying the previous one", step, manager.directory, e)
        broken.append(step)
    return None, None
  finally:
    if broken:
      _set_aside(manager, broken)


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  directory = os.fspath(manager.directory)
  if jax.process_index() == 0:
    aside = os.path.join(os.path.dirname(directory), "checkpoints_broken")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f"{step}-{int(time.time())}")
      os.replace(os.path.join(directory, str(step)), target)
      logging.warning("moved broken checkpoint %d to %s", step, target)
  multihost_utils.sync_global_devices("poster_cnn_set_aside_broken_checkpoints")
  manager.reload()
