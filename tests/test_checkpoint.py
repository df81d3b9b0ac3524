"""Checkpoint digests, fallback past damaged checkpoints, non-finite states refused.

Checkpoints are saved straight from a tiny initialised state (no training), so each
test costs one save and a few restores.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from poster_cnn import checkpoint, lost_saves, train
from poster_cnn.data import pipeline



@pytest.fixture(scope="module")
def setup(tiny_dataset):
  c = tiny.get_config()
  c.data_dir = tiny_dataset
  init, abstract, _ = train.state_factory(c, 4, 10, train.create_mesh())
  return c, init(), abstract


def _iterator(c):
  return iter(pipeline.train_dataset(c.data_dir, "train", global_batch_size=8,
                                     image=train.image_options(c), seed=0))


def _shifted(state, by: float):
  return state.replace(params=jax.tree.map(lambda x: x + by, state.params))


def _save_steps(workdir, c, state, steps=(1, 2)):
  """Checkpoints at `steps`, each with different params and iterator position."""
  manager = checkpoint.create_manager(workdir)
  it = _iterator(c)
  for step in steps:
    next(it)
    checkpoint.save(manager, step, _shifted(state, step), it)
  manager.wait_until_finished()
  return manager


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _flip_a_bit(step_dir):
  # One bit in the middle of each OCDBT data file: which file holds the arrays' chunks
  # (rather than B-tree nodes of no item restored) varies with the async writes' order.
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(step_dir, pattern="*"):
  for path in glob.glob(os.path.join(step_dir, "state", "**", pattern), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _swap_state_for_step_1s(step_dir):
  # Valid orbax data, other values: only the digest can tell.
  target = os.path.join(step_dir, "state")
  shutil.rmtree(target)
  shutil.copytree(os.path.join(os.path.dirname(step_dir), "1", "state"), target)


def _damage_iterator(step_dir):
  path, = glob.glob(os.path.join(step_dir, "data_iter", "process_*.json"))
  text = open(path).read()
  # Another position, as valid JSON: the first digit plus one (e.g. next_index 2 -> 3).
  damaged = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), text, count=1)
  assert damaged != text, text
  open(path, "w").write(damaged)


def _truncate_array_data(step_dir):
  _truncate(step_dir, os.path.join("d", "*"))


DAMAGE = {"flipped_bit": _flip_a_bit, "truncated": _truncate,
          "truncated_array_data": _truncate_array_data,
          "other_valid_state": _swap_state_for_step_1s, "iterator_state": _damage_iterator}


def test_every_checkpoint_carries_a_digest_that_verifies(setup, tmp_path):
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state)
  for step in (1, 2):
    assert os.path.isdir(tmp_path / "checkpoints" / str(step) / checkpoint.DIGEST_ITEM)
  it = _iterator(c)
  step, restored = checkpoint.restore_latest(manager, abstract, it)
  assert step == 2
  for a, b in zip(_leaves(restored), _leaves(_shifted(state, 2))):
    np.testing.assert_array_equal(a, b)
  reference = _iterator(c)
  next(reference), next(reference)
  np.testing.assert_array_equal(next(it)["image"], next(reference)["image"])


def test_damaged_latest_falls_back_past_it_with_the_iterator_of_the_previous(setup, tmp_path,
                                                                          caplog):
  # Every other kind of damage: tests/test_bad_input.py.
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state)
  _swap_state_for_step_1s(str(tmp_path / "checkpoints" / "2"))
  it = _iterator(c)
  with caplog.at_level(logging.WARNING):
    step, restored = checkpoint.restore_latest(manager, abstract, it)
  assert step == 1
  for a, b in zip(_leaves(restored), _leaves(_shifted(state, 1))):
    np.testing.assert_array_equal(a, b)
  # The iterator is at step 1's position, not at the damaged step 2's.
  reference = _iterator(c)
  next(reference)
  np.testing.assert_array_equal(next(it)["image"], next(reference)["image"])
  assert "checkpoint 2" in caplog.text and "fails its digest" in caplog.text
  assert [d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_broken")] == ["2"]


def test_every_checkpoint_unreadable_restores_nothing_and_leaves_the_iterator(setup, tmp_path):
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state)
  for step in (1, 2):
    _truncate(str(tmp_path / "checkpoints" / str(step)))
  it = _iterator(c)
  assert checkpoint.restore_latest(manager, abstract, it) == (None, None)
  np.testing.assert_array_equal(next(it)["image"], next(_iterator(c))["image"])
  assert sorted(d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_broken")) == ["1", "2"]


def test_a_sound_checkpoint_of_another_shape_is_never_set_aside(setup, tmp_path):
  c, state, _ = setup
  manager = _save_steps(tmp_path, c, state, steps=(1,))
  other = tiny.get_config()
  other.model.conv_features = (8, 8, 16, 32)
  _, abstract, _ = train.state_factory(other, 4, 10, train.create_mesh())
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"checkpoint 1 .*Conv_3"):
    checkpoint.restore_latest(manager, abstract)
  assert not (tmp_path / "checkpoints_broken").exists()
  assert manager.all_steps() == [1]


def test_a_non_finite_state_is_never_saved(setup, tmp_path):
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state, steps=(1,))
  bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 2 .*NaN or Inf in params/"):
    checkpoint.save(manager, 2, bad, None)
  manager.wait_until_finished()
  assert manager.all_steps() == [1]
  assert checkpoint.last_verified(manager, abstract) == 1
  _flip_a_bit(str(tmp_path / "checkpoints" / "1"))
  assert checkpoint.last_verified(manager, abstract) is None


def test_deleted_checkpoint_directory_is_recreated(setup, tmp_path, caplog):
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state, steps=(1,))
  shutil.rmtree(tmp_path / "checkpoints")
  with caplog.at_level(logging.WARNING):
    checkpoint.save(manager, 2, state, None)
    manager.wait_until_finished()
  assert "was deleted during the run" in caplog.text
  assert manager.all_steps() == [2]
  assert checkpoint.restore(manager, 2, abstract) is not None


def test_a_failed_save_is_a_lost_one_only_when_its_directory_went(setup, tmp_path,
                                                                  monkeypatch):
  c, state, _ = setup
  manager = _save_steps(tmp_path, c, state, steps=(1,))

  def fails():
    raise ValueError("No ArrayMetadata found")  # what orbax raises for deleted arrays
  monkeypatch.setattr(manager, "wait_until_finished", fails)
  with pytest.raises(ValueError, match="No ArrayMetadata"):  # the directory is there
    checkpoint.finish(manager)
  os.remove(tmp_path / "checkpoints" / ".poster_cnn")  # as when rm -rf and a write made it again
  assert checkpoint.finish(manager) is True


def test_saved_steps_put_back_by_hand_are_kept_when_the_directory_is_recreated(
    setup, tmp_path):
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state, steps=(1, 2))
  shutil.copytree(tmp_path / "checkpoints", tmp_path / "backup")
  shutil.rmtree(tmp_path / "checkpoints")
  shutil.copytree(tmp_path / "backup", tmp_path / "checkpoints",
                  ignore=shutil.ignore_patterns(".poster_cnn"))
  os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp")  # a lost save's remains
  checkpoint.save(manager, 3, state, None)
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2, 3]
  assert checkpoint.restore(manager, 2, abstract) is not None


def test_closed_event_loop_errors_alone_are_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr("sys.unraisablehook", seen.append)
  lost_saves.ignore_closed_event_loops()
  lost_saves.ignore_closed_event_loops()  # installed once
  unraisable = lambda e: type("U", (), {"exc_value": e})()  # noqa: E731
  sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
  other = unraisable(RuntimeError("something else"))
  sys.unraisablehook(other)
  assert seen == [other]


def test_nan_loss_saves_nothing_and_names_the_last_verified(tiny_dataset, tmp_path):
  c = tiny.get_config()
  c.data_dir = tiny_dataset
  c.num_train_steps, c.checkpoint_every_steps, c.log_every_steps = 4, 1, 100
  c.eval_every_steps = 100
  c.optimizer.learning_rate = float("nan")
  # Step 1's loss is finite (computed before the update); its state is not.
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint: none"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))


def test_every_checkpoint_unreadable_trains_afresh_from_a_fresh_iterator(tiny_dataset,
                                                                         tmp_path):
  from poster_cnn import logs
  c = tiny.get_config()
  c.data_dir = tiny_dataset
  c.num_train_steps, c.checkpoint_every_steps, c.log_every_steps = 4, 2, 1
  c.eval_every_steps = 100
  train.train_and_evaluate(c, str(tmp_path))
  for step in (2, 4):
    _truncate(str(tmp_path / "checkpoints" / str(step)))
  train.train_and_evaluate(c, str(tmp_path))
  losses = [(r["step"], r["loss"]) for r in logs.read_metrics(tmp_path) if r["split"] == "train"]
  # The second run repeats the first exactly: same initial state, same batches.
  assert [s for s, _ in losses] == [1, 2, 3, 4] * 2
  assert losses[:4] == losses[4:]
