"""The run directory's pure parts: atomic writes, run info versions, step parsing, config diffs,
dataset keys; and the one option-validation pass."""

import json
import os

import numpy as np
import pytest
from conftest import write_dataset

from configs import tiny
from poster_cnn import options, run_dir, train
from poster_cnn.data import records
from poster_cnn.run_dir import RunDir


def test_atomic_writes_leave_no_temporary_file(tmp_path):
  path = tmp_path / "sub" / "x.json"
  run_dir.atomic_write_json(path, {"a": 1})
  run_dir.atomic_write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  assert os.listdir(path.parent) == ["x.json"]


def test_evaluations_round_trip_and_keep_their_dtypes(tmp_path):
  preds = {"scores": np.random.default_rng(0).random((5, 3), np.float32),
           "labels": np.eye(5, 3, dtype=np.uint8), "index": np.arange(5, dtype=np.int64)}
  stem = tmp_path / "evaluations" / "d-1234" / "test_step3"
  assert not run_dir.evaluation_exists(stem)
  run_dir.write_evaluation(stem, {"macro_map": 0.5}, preds)
  assert run_dir.evaluation_exists(stem)
  summary, back = run_dir.read_evaluation(stem)
  assert summary == {"macro_map": 0.5}
  for k, v in preds.items():
    assert back[k].dtype == v.dtype
    np.testing.assert_array_equal(back[k], v)
  assert run_dir.evaluation_stem(str(tmp_path / "out.json")) == tmp_path / "out"


@pytest.mark.parametrize("step,expected", [("best", "best"), ("latest", "latest"), ("12", 12),
                                           (7, 7), (" 3 ", 3)])
def test_parse_step(step, expected):
  assert run_dir.parse_step(step) == expected


@pytest.mark.parametrize("step", ["foo", "-3", "1.5", ""])
def test_bad_steps_name_the_flag(step):
  with pytest.raises(ValueError, match=r"--step=.*'best', 'latest' or a step number"):
    run_dir.parse_step(step)


def test_numbered_steps_are_checked_against_the_checkpoints(tmp_path):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "checkpoints" / "8").mkdir()
  run = RunDir(tmp_path)
  assert run.steps() == [4, 8] and run.resolve_step("8") == 8
  with pytest.raises(ValueError, match=r"no checkpoint at step 5 .*steps: \[4, 8\]"):
    run.resolve_step(5)
  assert run.resolve_step(5, require_checkpoint=False) == 5


def test_datasets_of_one_name_get_different_keys(tmp_path):
  write_dataset(tmp_path / "a" / "data", {"test": 4}, shards=1, seed=0)
  write_dataset(tmp_path / "b" / "data", {"test": 4}, shards=1, seed=1)
  write_dataset(tmp_path / "c" / "data", {"test": 4}, shards=1, seed=0)
  keys = [run_dir.dataset_key(tmp_path / d / "data") for d in "abc"]
  assert keys[0].startswith("data-") and keys[0] != keys[1]
  assert keys[0] == keys[2]  # the same content under another path is the same dataset


def test_run_info_is_versioned_and_old_ones_still_read(tmp_path, tiny_dataset):
  run = RunDir(tmp_path)
  (tmp_path / "run_info.json").write_text(json.dumps(
      {"config": {"top_k": 2}, "vocabulary": ["a", "b"]}))  # format 1: no version field
  info = run.read_info()
  assert info["format_version"] == 1 and info["history"] == []
  assert run.vocabulary() == ("a", "b") and run.config().top_k == 2

  c = tiny.get_config()
  c.data_dir = tiny_dataset
  run.write_info(c, records.read_metadata(tiny_dataset), history_entry={"event": "start"})
  info = run.read_info()
  assert info["format_version"] == run_dir.FORMAT_VERSION
  assert info["dataset"]["fingerprint"] == run_dir.dataset_fingerprint(tiny_dataset)
  assert set(info["label_prior"]) == {"red", "green", "blue", "bright"}
  assert [h["event"] for h in info["history"]] == ["start"]

  (tmp_path / "run_info.json").write_text(json.dumps({**info, "format_version": 99}))
  with pytest.raises(ValueError, match="format version 99"):
    run.read_info()


def test_config_changes_tell_shape_changes_from_the_others():
  saved = {"model": {"conv_features": [8, 8], "conv_impl": "auto", "dense_dropout": 0.5},
           "optimizer": {"name": "adam", "learning_rate": 1e-3}, "ema_decay": 0.0,
           "num_train_steps": 6, "image": {"height": 32, "horizontal_flip": False},
           "vocabulary": ["a", "b"]}
  new = {"model": {"conv_features": (8, 16), "conv_impl": "im2col", "dense_dropout": 0.2},
         "optimizer": {"name": "adam", "learning_rate": 3e-3}, "ema_decay": 0.9,
         "num_train_steps": 12, "image": {"height": 32, "horizontal_flip": True},
         "vocabulary": ["b", "a"]}
  changes = run_dir.config_changes(saved, new)
  assert set(changes) == {"model.conv_features", "model.conv_impl", "model.dense_dropout",
                          "optimizer.learning_rate", "ema_decay", "num_train_steps",
                          "image.horizontal_flip", "vocabulary"}
  assert changes["optimizer.learning_rate"] == (1e-3, 3e-3)
  assert {k for k in changes if run_dir.structural(k)} == {
      "model.conv_features", "ema_decay", "vocabulary"}
  assert run_dir.config_changes(saved, saved) == {}


# ---------------------------------------------------------------- validate


def _config(data_dir, **overrides):
  c = tiny.get_config()
  c.data_dir = data_dir
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("overrides,devices,message", [
    ({"eval_batch_size": 6}, 4, r"--config.eval_batch_size=6 must be a positive multiple of "
                                r"the 4 device"),
    ({"batch_size": 6}, 4, r"--config.batch_size=6"),
    ({"train_split": "nosuch"}, 1, r"--config.train_split='nosuch': .* has no split 'nosuch'; "
                                   r"its splits: test, train, validation"),
    ({"eval_split": "val"}, 1, r"--config.eval_split='val'"),
    ({"image.height": 0}, 1, r"--config.image.height=0 must be a positive integer"),
    ({"image.resize": "crop"}, 1, r"--config.image.resize='crop'"),
    ({"log_every_steps": 0}, 1, r"--config.log_every_steps=0 must be positive"),
    ({"top_k": 0}, 1, r"--config.top_k=0"),
    ({"model.name": "vgg"}, 1, r"--config.model.name='vgg'"),
    ({"optimizer.name": "lion"}, 1, r"--config.optimizer.name='lion'"),
    ({"loss.gamma": -1.0}, 1, r"--config.loss.gamma"),
    ({"optimizer.freeze_backbone": True}, 1, r"freeze_backbone=True .* --config.init_from=DIR"),
    ({"batch_size": 512}, 1, r"--config.batch_size=512: split 'train' has only 96 examples"),
])
def test_validate_names_the_flag(tiny_dataset, overrides, devices, message):
  with pytest.raises(options.OptionError, match=message):
    options.validate(_config(tiny_dataset, **overrides), records.read_metadata(tiny_dataset),
                     devices)


def test_a_bad_split_stops_training_before_the_workdir_is_written(tiny_dataset, tmp_path):
  with pytest.raises(options.OptionError, match="its splits"):
    train.train_and_evaluate(_config(tiny_dataset, train_split="nosuch"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_models_take_their_fields_from_the_config_by_name(tiny_dataset):
  from poster_cnn import model
  c = _config(tiny_dataset, **{"model.conv_features": [4, 4, 8, 8], "model.dense_dropout": 0.3,
                               "model.bn_epsilon": 1e-4})
  m = model.create_model(c, 5)
  assert (m.conv_features, m.dense_dropout, m.bn_epsilon, m.num_classes) == (
      (4, 4, 8, 8), 0.3, 1e-4, 5)
  del c.model["dense_features"]  # a config saved before a field existed: its default
  assert model.create_model(c, 5).dense_features == model.PosterCNN.dense_features
