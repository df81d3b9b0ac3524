"""Scoring a checkpoint on other datasets: test-only, genres reordered, fewer or none shared;
the run's own files are never replaced; resuming with a changed config."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import VOCAB, write_dataset

from configs import tiny
from poster_cnn import evaluate, logs, run_dir, train
from poster_cnn.data import records
from poster_cnn.run_dir import RunDir


STEP = 6


def _snapshot(workdir) -> dict[str, bytes]:
  """Every file of a workdir outside its evaluations/, by relative path."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d != "evaluations"]
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, workdir)] = fh.read()
  return out


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
  """A trained tiny run with its own test evaluation (and thresholds) written."""
  workdir = tmp_path_factory.mktemp("run")
  c = tiny.get_config()
  c.data_dir = tiny_dataset
  train.train_and_evaluate(c, str(workdir))
  own = evaluate.evaluate_checkpoint(str(workdir), step=STEP)
  return RunDir(workdir), own


def _test_split_only(source: str, target) -> None:
  """A dataset holding only `source`'s test split (its very shards)."""
  meta = records.read_metadata(source)
  os.makedirs(target)
  for name in meta.splits["test"].filenames():
    shutil.copy(os.path.join(source, name), target)
  records.write_metadata(target, records.DatasetMetadata(
      vocabulary=meta.vocabulary, splits={"test": meta.splits["test"]}, image_size=None))


def test_a_test_only_dataset_elsewhere_is_scored_without_touching_the_run(run, tmp_path,
                                                                          tiny_dataset):
  run, own = run
  other = tmp_path / "elsewhere"
  _test_split_only(tiny_dataset, other)
  before = _snapshot(run.path)
  summary = evaluate.evaluate_checkpoint(run, step=STEP, data_dir=str(other))
  assert _snapshot(run.path) == before  # thresholds, run info, checkpoints untouched
  own_stem = run.evaluation(own["dataset"]["path"], "test", STEP)
  assert run_dir.read_evaluation(own_stem)[0]["macro_map"] == own["macro_map"]
  stem = run.evaluation(str(other), "test", STEP)
  assert stem != own_stem and run_dir.evaluation_exists(stem)
  saved, _ = run_dir.read_evaluation(stem)
  assert saved["dataset"] == {"path": str(other), "vocabulary": list(VOCAB),
                              "fingerprint": run_dir.dataset_fingerprint(other)}
  assert saved["checkpoint"] == {"path": str(run.checkpoint(STEP)), "step": STEP}
  # The run's own thresholds (its validation split) and its training label prior.
  assert summary["calibration_split"] == "validation"
  assert summary["per_class_threshold"] == own["per_class_threshold"]
  assert summary["prior_macro_map"] == pytest.approx(own["prior_macro_map"])
  assert summary["macro_map"] == pytest.approx(own["macro_map"])


def test_genres_in_another_order_are_remapped_by_name(run, tmp_path):
  run, own = run
  other = tmp_path / "reordered"
  write_dataset(other, {"train": 96, "validation": 24, "test": 24},
                vocabulary=tuple(reversed(VOCAB)))
  summary = evaluate.evaluate_checkpoint(run, step=STEP, data_dir=str(other))
  assert summary["vocabulary"] == list(VOCAB)
  for key in ("macro_map", "micro_map", "per_class_positives", "macro_f1_calibrated"):
    assert summary[key] == pytest.approx(own[key]), key


def test_fewer_genres_are_scored_on_the_shared_ones(run, tmp_path):
  run, own = run
  other = tmp_path / "fewer"
  write_dataset(other, {"train": 96, "validation": 24, "test": 24},
                vocabulary=("blue", "comedy", "red"))
  summary = evaluate.evaluate_checkpoint(run, step=STEP, data_dir=str(other))
  assert summary["vocabulary"] == ["red", "blue"]  # the model's order
  for genre in ("red", "blue"):
    i, j = summary["vocabulary"].index(genre), VOCAB.index(genre)
    assert summary["per_class_ap"][i] == pytest.approx(own["per_class_ap"][j])
    assert summary["per_class_threshold"][i] == own["per_class_threshold"][j]


def test_no_shared_genre_names_both_vocabularies(run, tmp_path):
  run, _ = run
  other = tmp_path / "foreign"
  write_dataset(other, {"test": 8}, vocabulary=("comedy", "drama"))
  with pytest.raises(ValueError, match=r"shares no genre.*'comedy', 'drama'.*'red', 'green'"):
    evaluate.evaluate_checkpoint(run, step=STEP, data_dir=str(other))


def test_calibrating_on_request_writes_beside_the_evaluation(run, tmp_path):
  run, own = run
  before = _snapshot(run.path)
  summary = evaluate.evaluate_checkpoint(run, step=STEP, split="test", calibrate="test")
  assert _snapshot(run.path) == before
  assert summary["calibration_split"] == "test"
  assert summary["output"].endswith("test_step6_calibrated_test")
  assert run_dir.evaluation_exists(summary["output"])
  # The default evaluation is still there, unchanged.
  own_stem = run.evaluation(own["dataset"]["path"], "test", STEP)
  assert run_dir.read_evaluation(own_stem)[0]["calibration_split"] == "validation"


def test_a_missing_split_names_the_available_ones(run, tmp_path):
  run, _ = run
  other = tmp_path / "only_train"
  write_dataset(other, {"train": 8}, shards=1)
  with pytest.raises(ValueError, match=r"--split='test': .* its splits: train"):
    evaluate.evaluate_checkpoint(run, step=STEP, data_dir=str(other))


# ---------------------------------------------------------------- resume


def test_resume_with_a_changed_model_stops_and_changes_nothing(tiny_dataset, tmp_path):
  c = tiny.get_config()
  c.data_dir = tiny_dataset
  c.num_train_steps = 3
  train.train_and_evaluate(c, str(tmp_path))
  before = _snapshot(tmp_path)
  changed = tiny.get_config()
  changed.data_dir = tiny_dataset
  changed.num_train_steps = 6
  changed.model.conv_features = (8, 8, 16, 32)
  changed.ema_decay = 0.9
  with pytest.raises(train.ConfigChangedError,
                     match=r"ema_decay: 0.0 -> 0.9\n  model.conv_features: \[8, 8, 16, 16\] -> "
                           r"\[8, 8, 16, 32\]\n"):
    train.train_and_evaluate(changed, str(tmp_path))
  assert _snapshot(tmp_path) == before
  assert not (tmp_path / "checkpoints_broken").exists()

  # Other changes are taken, logged and recorded.
  c.num_train_steps = 6
  c.optimizer.learning_rate = 2e-3
  train.train_and_evaluate(c, str(tmp_path))
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert [h["event"] for h in info["history"]] == ["start", "resume"]
  assert info["history"][1]["from_step"] == 3
  assert info["history"][1]["changes"] == {"num_train_steps": [3, 6],
                                           "optimizer.learning_rate": [1e-3, 2e-3]}
  assert info["config"]["optimizer"]["learning_rate"] == 2e-3
  steps = [r["step"] for r in logs.read_metrics(tmp_path) if r["split"] == "train"]
  assert steps == [2, 3, 4, 6]  # resumed at 3, not restarted
