"""orbax checkpoints of the train state together with the grain iterator.

Layout of `<workdir>/checkpoints/<step>/`:
  state/      the TrainState (params, batch_stats, opt_state, step, rng; ema when kept)
  data_iter/  the grain iterator's position (per process)
  metrics/    validation metrics, when the step was evaluated

Saving both in one step directory is what makes a resumed run continue
with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from poster_cnn.data import iterator_state

BEST_METRIC = "macro_map"


def _best_fn(metrics: dict) -> float:
  return float(metrics[BEST_METRIC])


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


# What a run needs besides its checkpoints (config, vocabulary), beside them in the
# workdir; written by train.write_run_info.
RUN_INFO_FILE = "run_info.json"


def locate(path: str | os.PathLike, step: str | int = "best") -> tuple[str, str | int]:
  """(workdir, step) from a training workdir or one of its checkpoint directories.

  `WORKDIR/checkpoints/N` means step N of WORKDIR (then `step` must be left at
  'best' or name N too); `WORKDIR` and `WORKDIR/checkpoints` keep `step`.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    workdir, found = os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    if str(step) not in ("best", str(found)):
      raise ValueError(f"{path} is the checkpoint of step {found}, but step {step!r} was asked "
                       "for: pass the workdir with a step, or the checkpoint alone")
    step = found
  elif os.path.basename(path) == "checkpoints":
    workdir = os.path.dirname(path)
  else:
    workdir = path
  if not os.path.exists(os.path.join(workdir, RUN_INFO_FILE)):
    raise ValueError(f"{path} is neither a training workdir (no {RUN_INFO_FILE} in {workdir}) nor "
                     "one of its checkpoints (WORKDIR/checkpoints/STEP)")
  return workdir, step


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


class TopologyChanged(ValueError):
  """The checkpoint's iterator state is of another process or worker count."""


def _saved_iterator_topology(manager: ocp.CheckpointManager, step: int,
                             data_iter: grain.DatasetIterator) -> str | None:
  """None if `data_iter` can load the state saved at `step` as it is, else what wrote it."""
  directory = epath.Path(manager.directory) / str(step) / "data_iter"
  if not directory.exists():
    return None  # (restore then says what is missing)
  mine = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if mine.exists():
    saved = json.loads(mine.read_text())
    if iterator_state.same_layout(saved, data_iter.get_state()):
      return None
    workers = len(saved.get("iterators_in_use_states", ()))
    return f"{jax.process_count()} process(es) with {workers} input worker(s) each"
  counts = {f.name.rsplit("-of-", 1)[-1].removesuffix(".json") for f in directory.glob("process_*")}
  return f"{' or '.join(sorted(counts))} process(es)"


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: grain.DatasetIterator | None = None, *,
            batch_size: int | None = None) -> Any:
  """Restores the state at `step` into `abstract_state`'s shapes and shardings.

  `data_iter`, if given, is moved to the saved position in place. A checkpoint written
  by another number of processes or input workers holds iterator states this one
  cannot load; given `batch_size` (this process's), the iterator is then moved to
  `step` batches into its stream instead (the training loop draws one per step), with
  a warning saying what that keeps (poster_cnn/data/iterator_state.py); without it,
  TopologyChanged.
  """
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  saved_by = None if data_iter is None else _saved_iterator_topology(manager, step, data_iter)
  if saved_by is not None and batch_size is None:
    raise TopologyChanged(f"the data iterator at step {step} in {manager.directory} was saved "
                          f"by {saved_by}, this run has {jax.process_count()}")
  if data_iter is not None and saved_by is None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if saved_by is not None:
    data_iter.set_state(iterator_state.state_after(data_iter.get_state(), step, batch_size))
    logging.warning(
        "checkpoint at step %d was saved by %s; this run has %d process(es): each "
        "process's input resumes %d batches into its stream. The examples ahead are those "
        "of an uninterrupted run only if the split's size is a multiple of both process "
        "counts, and augmentation draws differ.", step, saved_by, jax.process_count(), step)
  return restored["state"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: grain.DatasetIterator | None = None, *,
                   batch_size: int | None = None) -> tuple[int | None, Any]:
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
        return step, restore(manager, step, abstract_state, data_iter, batch_size=batch_size)
      except TopologyChanged:
        raise  # not broken: readable by the topology that wrote it
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
