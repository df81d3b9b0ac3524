"""orbax checkpoints of the train state together with the grain iterator.

Layout of `<workdir>/checkpoints/<step>/`:
  state/      the TrainState (params, batch_stats, opt_state, step, rng; ema when kept)
  data_iter/  the grain iterator's position (per process)
  digest/     sha256 of every state array and of each process's iterator file, written
              in the same (atomic) save; checked at restore
  metrics/    validation metrics, when the step was evaluated
and `<workdir>/checkpoints/.poster_cnn`, which tells the run's directory from one deleted
under it (rm -rf) and recreated by a save in flight.

Saving both in one step directory is what makes a resumed run continue
with exactly the batches an uninterrupted run would have seen.

The workdir may be local, on gs:// (orbax writes arrays through tensorstore's gcs
driver, metadata through etils.epath) or on s3:// (tensorstore's s3 driver, which orbax
0.12 does not reach by itself: `orbax_s3` teaches it; steps are committed with a
commit_success.txt file there, as orbax does on GCS, since S3 cannot rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from poster_cnn import lost_saves, orbax_s3, storage
from poster_cnn.lost_saves import first_line
from poster_cnn.data import iterator_state

BEST_METRIC = "macro_map"
DATA_ITER_ITEM = "data_iter"
DIGEST_ITEM = "digest"
DIGEST_FORMAT = 1


def _best_fn(metrics: dict) -> float:
  return float(metrics[BEST_METRIC])


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """WORKDIR/checkpoints as orbax wants it (absolute, or a gs:// or s3:// URL).

  Raises storage.StorageError for a remote workdir whose package is missing, or an
  s3:// one this orbax cannot be taught (see `orbax_s3`), before anything is written.
  """
  workdir = storage.path(workdir)
  if storage.scheme(workdir) == "s3":
    problem = orbax_s3.missing()
    if problem:
      raise storage.StorageError(
          f"{os.fspath(workdir)}: checkpoints cannot be written to s3:// here: {problem}; "
          "use a gs:// or local --workdir")
    orbax_s3.install()
  return os.fspath(workdir / "checkpoints")


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
      create=not read_only, save_interval_steps=0 if read_only else 1,
      # orbax picks commit_success.txt for gs:// itself; S3 has no rename either.
      atomicity_options=(ocp.options.AtomicityOptions(
          mode=ocp.options.AtomicityMode.COMMIT_FILE)
          if storage.scheme(workdir) == "s3" else None))
  lost_saves.ignore_closed_event_loops()
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     DATA_ITER_ITEM: grain.checkpoint.CheckpointHandler(),
                     DIGEST_ITEM: ocp.JsonCheckpointHandler()})
  if not read_only:
    lost_saves.watch(os.fspath(manager.directory))
    multihost_utils.sync_global_devices("poster_cnn_mark_checkpoint_dir")
  return manager


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: unreadable, failing its digest, or of another shape."""


class CorruptCheckpointError(CheckpointError):
  """Unreadable files, or data that differs from the digest written when it was saved."""


class IncompatibleCheckpointError(CheckpointError):
  """A sound checkpoint whose arrays do not fit the state the config describes."""


class NonFiniteStateError(RuntimeError):
  """The state to save holds NaN or Inf: saving it would make every resume crash again."""


def _path_name(path) -> str:
  """A pytree key path as 'opt_state/0/mu/Conv_0/kernel', the same for a TrainState and
  for the nested dicts orbax's metadata gives."""
  names = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


def _host_copy(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("checkpoint digests need a replicated train state")
    x = x.addressable_data(0)
  return np.asarray(x)


def state_digests(state: Any) -> tuple[dict[str, str], list[str]]:
  """sha256 per leaf over dtype, shape and bytes, keyed by path; and the paths of
  floating-point leaves holding NaN or Inf."""
  digests, non_finite = {}, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name, a = _path_name(path), np.ascontiguousarray(_host_copy(leaf))
    h = hashlib.sha256(f"{a.dtype.name}{a.shape}".encode())
    h.update(a.tobytes())
    digests[name] = h.hexdigest()
    if jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(
        a.astype(np.float32) if a.dtype.itemsize < 4 else a).all():
      non_finite.append(name)
  return digests, non_finite


def _iterator_digest(data_iter: grain.DatasetIterator) -> str:
  # Exactly the text grain's CheckpointHandler writes, so the file itself is checked.
  return hashlib.sha256(json.dumps(data_iter.get_state(), indent=4).encode()).hexdigest()


def _iterator_file(step_dir: str) -> str:
  return os.path.join(step_dir, DATA_ITER_ITEM,
                      f"process_{jax.process_index()}-of-{jax.process_count()}.json")


def _all_processes(value: np.ndarray) -> np.ndarray:
  """`value` of every process, stacked on a new first axis."""
  if jax.process_count() == 1:
    return value[None]
  return np.asarray(multihost_utils.process_allgather(value))


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iter: grain.DatasetIterator | None, metrics: dict | None = None,
         *, force: bool = True) -> bool:
  """Starts saving `state` (and the iterator's position) at `step`, with their digests.

  The digests (sha256 of every array and of each process's iterator state) are an item
  of the same checkpoint, so orbax finalises them with it: a checkpoint that exists
  has them. Raises NonFiniteStateError, saving nothing, when a float array of `state`
  holds NaN or Inf.
  """
  digests, non_finite = state_digests(state)
  if non_finite:
    raise NonFiniteStateError(
        f"the train state at step {step} holds NaN or Inf in {', '.join(non_finite[:3])}"
        + (f" and {len(non_finite) - 3} more arrays" if len(non_finite) > 3 else "")
        + "; it was not saved")
  digest = {"format": DIGEST_FORMAT, "state": digests}
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    mine = np.frombuffer(bytes.fromhex(_iterator_digest(data_iter)), np.uint8)
    digest[DATA_ITER_ITEM] = [bytes(d).hex() for d in _all_processes(mine)]
    items[DATA_ITER_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
  items[DIGEST_ITEM] = ocp.args.JsonSave(digest)
  finish(manager)  # orbax would wait for the previous save too, and raise what it raised
  _recreate_if_deleted(manager)
  try:
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
  except Exception as e:
    if not lost_saves.lost(e, os.fspath(manager.directory)):
      raise
    logging.warning("checkpoint %d lost: %s was deleted while it was written (%s)", step,
                    manager.directory, first_line(e))
    return False


def finish(manager: ocp.CheckpointManager) -> bool:
  """Waits for the saves in flight. One whose directory was deleted meanwhile (rm -rf
  WORKDIR/checkpoints) is lost with a warning, not a traceback, and True is returned;
  the next save recreates the directory."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    if not lost_saves.lost(e, os.fspath(manager.directory)):
      raise
    logging.warning("%s was deleted while a checkpoint was written into it: that checkpoint "
                    "is lost (%s)", manager.directory, first_line(e))
    return True
  return False


def _recreate_if_deleted(manager: ocp.CheckpointManager) -> None:
  """Recreates checkpoints/ when it was deleted during the run, on every process
  together (the decision is collective, so that no process waits alone at a barrier)."""
  directory = os.fspath(manager.directory)
  if not _all_processes(np.int32(lost_saves.deleted(directory))).any():
    return
  finish(manager)
  multihost_utils.sync_global_devices("poster_cnn_saves_into_deleted_dir_ended")
  if jax.process_index() == 0:
    logging.warning("%s was deleted during the run: recreating it; the checkpoints it "
                    "held are lost", directory)
    os.makedirs(directory, exist_ok=True)
    # What tensorstore recreated of the lost saves; whatever else is there now (a copy
    # of saved steps put back by hand) is kept.
    for name in os.listdir(directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    lost_saves.mark(directory)
  multihost_utils.sync_global_devices("poster_cnn_recreate_checkpoint_dir")
  manager.reload()


def _check_fits(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises IncompatibleCheckpointError when the saved arrays' paths, shapes or dtypes
  differ from `abstract_state`'s, CorruptCheckpointError when they cannot be read."""
  try:
    saved = manager.item_metadata(step)["state"]
    saved = {_path_name(p): (tuple(m.shape), np.dtype(m.dtype))
             for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  except Exception as e:  # orbax raises many types for unreadable metadata
    raise CorruptCheckpointError(f"checkpoint {step} in {_step_dir(manager, step)}: its "
                                 f"metadata cannot be read ({type(e).__name__}: {e})") from None
  wanted = {_path_name(p): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if saved == wanted:
    return
  params_first = lambda k: (not k.startswith("params/"), k)  # noqa: E731
  differences = [f"{k}: saved {saved[k][0]} {saved[k][1]}, config {wanted[k][0]} {wanted[k][1]}"
                 for k in sorted(saved.keys() & wanted.keys(), key=params_first)
                 if saved[k] != wanted[k]]
  differences += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
  differences += [f"{k}: only in the config" for k in sorted(wanted.keys() - saved.keys())]
  raise IncompatibleCheckpointError(
      f"checkpoint {step} in {_step_dir(manager, step)} holds a train state of another shape than "
      f"the config describes ({'; '.join(differences[:4])}"
      + (f"; {len(differences) - 4} more" if len(differences) > 4 else "")
      + "): the model, image size or optimizer changed. Train in a new --workdir, or "
      "restore the config the run was started with")


class TopologyChanged(ValueError):
  """The checkpoint's iterator state is of another process or worker count."""


def _saved_iterator_topology(manager: ocp.CheckpointManager, step: int,
                             data_iter: grain.DatasetIterator) -> str | None:
  """None if `data_iter` can load the state saved at `step` as it is, else what wrote it."""
  directory = epath.Path(manager.directory) / str(step) / DATA_ITER_ITEM
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
  """Restores the state at `step` into `abstract_state`'s shapes and shardings, and
  checks it against the digests written at save time.

  `data_iter`, if given, is moved to the saved position in place, and only once the
  state and the iterator's file have both verified. A checkpoint written by another
  number of processes or input workers holds iterator states this one cannot load;
  given `batch_size` (this process's), the iterator is then moved to `step` batches
  into its stream instead (the training loop draws one per step), with a warning
  saying what that keeps (poster_cnn/data/iterator_state.py).

  Raises:
    CorruptCheckpointError: unreadable, or not what was saved (the message names the
      array or file).
    IncompatibleCheckpointError: the checkpoint is sound but holds another state shape.
    TopologyChanged: saved by another topology, and no `batch_size` to remap with.
  """
  step_dir = _step_dir(manager, step)
  _check_fits(manager, step, abstract_state)
  try:
    saved_by = None if data_iter is None else _saved_iterator_topology(manager, step, data_iter)
  except (OSError, ValueError) as e:  # a damaged iterator file
    raise CorruptCheckpointError(f"checkpoint {step}: {_iterator_file(step_dir)} cannot be "
                                 f"read ({type(e).__name__}: {first_line(e)})") from None
  if saved_by is not None and batch_size is None:
    raise TopologyChanged(f"the data iterator at step {step} in {manager.directory} was saved "
                          f"by {saved_by}, this run has {jax.process_count()}")
  has_digest = epath.Path(step_dir, DIGEST_ITEM).exists()
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if has_digest:
    items[DIGEST_ITEM] = ocp.args.JsonRestore()
  try:
    with lost_saves.quiet_event_loop():
      restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax and tensorstore raise many types for unreadable data
    raise CorruptCheckpointError(f"checkpoint {step} in {step_dir} cannot be read "
                                 f"({type(e).__name__}: {first_line(e)})") from None
  state = restored["state"]
  if not has_digest:
    logging.warning("checkpoint %d in %s has no digest (written before checkpoints carried "
                    "one): restored unverified", step, step_dir)
  else:
    # Another topology's iterator files are not this process's to check or load.
    _verify(step, step_dir, state, restored[DIGEST_ITEM], data_iter if saved_by is None else None)
  if data_iter is not None and saved_by is None:
    try:
      manager.restore(step, args=ocp.args.Composite(
          **{DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(data_iter)}))
    except Exception as e:
      raise CorruptCheckpointError(f"checkpoint {step}: the data iterator state in "
                                   f"{os.path.dirname(_iterator_file(step_dir))} cannot be "
                                   f"restored ({type(e).__name__}: {first_line(e)})") from None
  elif data_iter is not None:
    data_iter.set_state(iterator_state.state_after(data_iter.get_state(), step))
    logging.warning(
        "checkpoint at step %d was saved by %s; this run has %d process(es): each "
        "process's input resumes %d batches into its stream. The examples ahead are those "
        "of an uninterrupted run only if the split's size is a multiple of both process "
        "counts, and augmentation draws differ.", step, saved_by, jax.process_count(), step)
  return state


def _verify(step: int, step_dir: str, state: Any, digest: dict,
            data_iter: grain.DatasetIterator | None) -> None:
  saved = digest.get("state", {})
  digests, _ = state_digests(state)
  bad = [k for k in digests if saved.get(k) != digests[k]]
  if bad:
    raise CorruptCheckpointError(
        f"checkpoint {step} in {os.path.join(step_dir, 'state')} fails its digest: "
        f"{', '.join(bad[:3])}" + (f" and {len(bad) - 3} more arrays" if len(bad) > 3 else "")
        + " differ from what was saved (damaged on disk)")
  if data_iter is None:
    return
  path = _iterator_file(step_dir)
  expected = digest.get(DATA_ITER_ITEM, [])
  try:
    found = hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()
  except OSError as e:
    raise CorruptCheckpointError(f"checkpoint {step}: {path} cannot be read "
                                 f"({e.strerror or e})") from None
  if jax.process_index() >= len(expected) or expected[jax.process_index()] != found:
    raise CorruptCheckpointError(f"checkpoint {step}: {path} fails its digest (damaged on "
                                 "disk, or saved by a different number of processes)")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iter: grain.DatasetIterator | None = None, *,
                   batch_size: int | None = None) -> tuple[int | None, Any]:
  """The newest checkpoint that restores and verifies; older ones are tried if it fails.

  A preempted or killed run can leave a partial latest step, and a disk can damage
  one; training then resumes from the one before, with a warning naming it. Steps
  that fail are moved to `<workdir>/checkpoints_broken/` (kept for inspection, and out
  of the way of the step numbers training will save again). A sound checkpoint of
  another state shape is never moved: IncompatibleCheckpointError stops the run.

  Returns:
    (step, state), or (None, None) when no checkpoint restores. `data_iter` is moved
    only to the position of the checkpoint returned.
  """
  broken = []
  _recreate_if_deleted(manager)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      error = None
      try:
        state = restore(manager, step, abstract_state, data_iter, batch_size=batch_size)
      except CorruptCheckpointError as e:
        error = str(e)
      # Every process must fall back together (iterator files are per process).
      if _all_processes(np.int32(error is not None)).any():
        logging.warning("%s; trying the previous checkpoint",
                        error or f"checkpoint {step} failed on another process")
        broken.append(step)
        continue
      return step, state
    return None, None
  finally:
    if broken:
      _set_aside(manager, broken)


def last_verified(manager: ocp.CheckpointManager, abstract_state: Any) -> int | None:
  """The newest step that restores and matches its digest (None if none does)."""
  finish(manager)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restore(manager, step, abstract_state)
      return step
    except CheckpointError:
      continue
  return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    aside = directory.parent / "checkpoints_broken"
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      source = directory / str(step)
      if not source.exists():  # deleted meanwhile: nothing to keep
        continue
      target = aside / f"{step}-{int(time.time())}"
      source.rename(target)
      logging.warning("moved broken checkpoint %d to %s", step, target)
  multihost_utils.sync_global_devices("poster_cnn_set_aside_broken_checkpoints")
  manager.reload()
