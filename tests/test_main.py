"""The poster-cnn entry point end to end: train, evaluate and predict in subprocesses."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "poster_cnn.main", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  _run("--config=configs/tiny.py", f"--config.data_dir={tiny_dataset}", f"--workdir={workdir}")
  return workdir


def test_evaluate_writes_metrics_thresholds_and_a_table(trained):
  out = _run("--mode=evaluate", f"--workdir={trained}", "--step=latest").stdout
  assert "macro_map" in out and "prior_macro_map" in out and "red" in out
  result = json.loads((trained / "eval_test_step6.json").read_text())
  assert result["num_examples"] == 24 and 0 <= result["macro_map"] <= 1
  thresholds = json.loads((trained / "thresholds_step_6.json").read_text())
  assert set(thresholds) == {"red", "green", "blue", "bright"}


def test_predict_reports_unreadable_files_and_keeps_going(trained, tmp_path):
  folder = tmp_path / "posters"
  folder.mkdir()
  for i, colour in enumerate([(250, 10, 10), (10, 10, 250), (120, 120, 120)]):
    Image.new("RGB", (20, 30), colour).save(folder / f"p{i}.jpg")
  (folder / "broken.jpg").write_bytes(b"not an image")
  proc = _run("--mode=predict", f"--workdir={trained}", f"--images={folder}", "--format=json",
              "--top_k=2", "--step=latest")
  predictions = json.loads(proc.stdout)
  assert [os.path.basename(p["path"]) for p in predictions] == ["p0.jpg", "p1.jpg", "p2.jpg"]
  for p in predictions:
    assert len(p["top_k"]) == 2 and set(p["probabilities"]) == {"red", "green", "blue", "bright"}
    probs = [v for _, v in p["top_k"]]
    assert probs == sorted(probs, reverse=True)
  assert "broken.jpg" in proc.stderr


def test_bad_flags_are_reported(tiny_dataset, tmp_path):
  proc = _run("--config=configs/tiny.py", f"--config.data_dir={tmp_path}/missing",
              f"--workdir={tmp_path}/w", check=False)
  assert proc.returncode != 0 and "dataset_info.json not found" in proc.stderr
  proc = _run("--mode=evaluate", f"--workdir={tmp_path}/nothing", check=False)
  assert proc.returncode != 0 and "no run_info.json in" in proc.stderr


def test_evaluate_a_checkpoint_directory(trained):
  out = _run("--mode=evaluate", f"--workdir={trained}/checkpoints/6", "--split=validation").stdout
  assert "macro_map" in out
  assert json.loads((trained / "eval_validation_step6.json").read_text())["step"] == 6


def test_locate_reads_workdirs_and_checkpoint_paths(tmp_path):
  from poster_cnn import checkpoint
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "run_info.json").write_text("{}")
  assert checkpoint.locate(tmp_path) == (str(tmp_path), "best")
  assert checkpoint.locate(tmp_path, "latest") == (str(tmp_path), "latest")
  assert checkpoint.locate(tmp_path / "checkpoints", 7) == (str(tmp_path), 7)
  assert checkpoint.locate(tmp_path / "checkpoints" / "40") == (str(tmp_path), 40)
  assert checkpoint.locate(tmp_path / "checkpoints" / "40", "40") == (str(tmp_path), 40)
  with pytest.raises(ValueError, match="checkpoint of step 40"):
    checkpoint.locate(tmp_path / "checkpoints" / "40", "latest")
  with pytest.raises(ValueError, match="neither a training workdir"):
    checkpoint.locate(tmp_path / "checkpoints" / "40" / "state")
