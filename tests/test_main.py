"""The poster-cnn entry point end to end: train, evaluate and predict in subprocesses."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from poster_cnn.run_dir import RunDir


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


def _evaluation(workdir, data_dir, split, step) -> dict:
  stem = RunDir(workdir).evaluation(data_dir, split, step)
  return json.loads((stem.parent / (stem.name + ".json")).read_text())


def test_evaluate_writes_metrics_thresholds_and_a_table(trained, tiny_dataset):
  out = _run("--mode=evaluate", f"--workdir={trained}", "--step=latest").stdout
  assert "macro mAP" in out and "label prior macro mAP" in out and "red" in out
  result = _evaluation(trained, tiny_dataset, "test", 6)
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


def test_evaluate_a_checkpoint_directory(trained, tiny_dataset):
  out = _run("--mode=evaluate", f"--workdir={trained}/checkpoints/6", "--split=validation").stdout
  assert "macro mAP" in out
  assert _evaluation(trained, tiny_dataset, "validation", 6)["step"] == 6


def test_locate_reads_workdirs_and_checkpoint_paths(tmp_path):
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "run_info.json").write_text("{}")
  locate = lambda *a: (lambda r: (str(r[0].path), r[1]))(RunDir.locate(*a))
  assert locate(tmp_path) == (str(tmp_path), "best")
  assert locate(tmp_path, "latest") == (str(tmp_path), "latest")
  assert locate(tmp_path / "checkpoints", 7) == (str(tmp_path), 7)
  assert locate(tmp_path / "checkpoints" / "40") == (str(tmp_path), 40)
  assert locate(tmp_path / "checkpoints" / "40", "40") == (str(tmp_path), 40)
  with pytest.raises(ValueError, match="checkpoint of step 40"):
    locate(tmp_path / "checkpoints" / "40", "latest")
  with pytest.raises(ValueError, match="neither a training workdir"):
    locate(tmp_path / "checkpoints" / "40" / "state")
  with pytest.raises(ValueError, match="--step='foo'"):
    locate(tmp_path, "foo")


def test_predict_refuses_what_names_no_readable_file(trained, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (tmp_path / "bad.jpg").write_bytes(b"not an image")
  for images, message in [(str(empty), "a folder without images"),
                          (str(tmp_path / "missing.jpg"), "no such file"),
                          (str(tmp_path / "*.png"), "matches no file"),
                          (str(tmp_path / "bad.jpg"), "none of the 1 file(s) could be read")]:
    proc = _run("--mode=predict", f"--workdir={trained}", f"--images={images}", check=False)
    assert proc.returncode != 0 and message in proc.stderr, (images, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--top_k=0"], "--top_k=0 must be a positive"),
    (["--top_k=-3"], "--top_k=-3 must be a positive"),
    (["--top_k=9"], "--top_k=9 must be between 1 and the 4 genres"),
    (["--output=/nonexistent/dir/out.csv"], "--output=/nonexistent/dir/out.csv: folder"),
    (["--step=foo"], "--step='foo': must be 'best', 'latest' or a step number"),
])
def test_bad_predict_flags_are_one_clear_line(trained, tmp_path, args, message):
  Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "p.jpg")
  proc = _run("--mode=predict", f"--workdir={trained}", f"--images={tmp_path}/p.jpg", *args,
              check=False)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_predict_csv_has_a_column_per_genre_and_names_the_checkpoint(trained, tmp_path):
  import csv
  Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "p.jpg")
  out = tmp_path / "out.csv"
  _run("--mode=predict", f"--workdir={trained}", f"--images={tmp_path}/p.jpg", "--format=csv",
       f"--output={out}", "--step=latest")
  [row] = list(csv.DictReader(out.open()))
  probs = [float(row[g]) for g in ("red", "green", "blue", "bright")]
  assert all(0 <= p <= 1 for p in probs)
  assert row["checkpoint"] == str(trained / "checkpoints" / "6") and row["step"] == "6"
  table = _run("--mode=predict", f"--workdir={trained}", f"--images={tmp_path}/p.jpg",
               "--step=latest").stdout
  assert f"checkpoint: {trained / 'checkpoints' / '6'} (step 6)" in table


def test_config_by_name_and_an_unknown_field_is_one_line(tmp_path):
  proc = _run("--config=tiny", "--config.nosuch=3", f"--workdir={tmp_path}/w", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--config.nosuch: the config has no field 'nosuch'" in proc.stderr
  assert "batch_size" in proc.stderr  # the fields there are listed
  proc = _run("--config=tiny", "--config.model.nosuch=3", f"--workdir={tmp_path}/w", check=False)
  assert "--config.model.nosuch: the config has no field 'nosuch'" in proc.stderr
  assert "conv_features" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_help_lists_the_flags_of_the_installed_command():
  script = os.path.join(os.path.dirname(sys.executable), "poster-cnn")
  proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  for flag in ("--workdir", "--mode", "--images", "--calibrate", "--config"):
    assert flag in proc.stdout, proc.stdout[-2000:]
