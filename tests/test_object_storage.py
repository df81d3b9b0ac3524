"""gs:// and s3:// workdirs and data dirs, end to end against local emulators.

A module fixture starts moto's S3 server and the GCS emulator (tests/gcs_emulator.py)
on free loopback ports, with every cloud client's metadata host pointed at a dead
port so nothing reaches a real endpoint, and uploads the tiny dataset to both.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import tiny
from poster_cnn import evaluate, logs, predict, run_dir, storage, train
from test_train import _cli, _final_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MISSING = [p for p in ("gcsfs", "s3fs", "moto", "gcp_storage_emulator")
            if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs {', '.join(_MISSING)} "
                                "(pip install -e '.[test]')")
BUCKET = "poster-cnn-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, name: str) -> None:
  deadline = time.time() + 60
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.skip(f"{name} exited at start (code {proc.returncode})")
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      return
    except OSError:
      time.sleep(0.1)
  pytest.skip(f"{name} did not listen on port {port} within 60 s")


@pytest.fixture(scope="module")
def emulators(tiny_dataset, tmp_path_factory):
  """{'env': the variables that point every client at the emulators, 'gs', 's3': the
  tiny dataset's URL on each}."""
  gcs_port, s3_port = _free_port(), _free_port()
  env = {
      "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}",
      "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{gcs_port}",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
      "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
      "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
      "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_ROOT": "127.0.0.1:1",
      "GCE_METADATA_IP": "127.0.0.1:1", "NO_GCE_CHECK": "True",
  }
  logs_dir = tmp_path_factory.mktemp("emulators")
  procs = []
  saved = {k: os.environ.get(k) for k in env}
  try:
    for name, cmd, port in (
        ("moto_server", [os.path.join(os.path.dirname(sys.executable), "moto_server"),
                         "-H", "127.0.0.1", "-p", str(s3_port)], s3_port),
        ("gcs emulator", [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"),
                          "127.0.0.1", str(gcs_port)], gcs_port)):
      with open(logs_dir / f"{port}.log", "wb") as out:
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
      _wait_for(port, procs[-1], name)
    os.environ.update(env)
    urls = {}
    for scheme in ("gs", "s3"):
      fs = storage.filesystem(f"{scheme}://{BUCKET}")
      fs.mkdir(f"{scheme}://{BUCKET}", create_parents=True)
      urls[scheme] = f"{scheme}://{BUCKET}/data"
      storage.upload_tree(tiny_dataset, urls[scheme])
    yield {"env": {**os.environ, "JAX_PLATFORMS": "cpu"}, **urls}
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    for proc in procs:
      proc.terminate()
      proc.wait(timeout=30)


def _a_poster(dataset, folder) -> str:
  """The first test-split poster of `dataset`, written to a JPEG file in `folder`."""
  from poster_cnn.data import records, tfrecord
  meta = records.read_metadata(dataset)
  source = tfrecord.TFRecordSource(records.split_files(dataset, meta, "test"))
  poster = folder / "poster.jpg"
  poster.write_bytes(records.decode_example(source[0])["image"])
  return str(poster)


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "s3fs" else real(name, *a))
  with pytest.raises(storage.StorageError) as e:
    run_dir.RunDir("s3://bucket/run")
  assert str(e.value) == ("s3://bucket/run: s3:// paths need s3fs: "
                          "pip install 'poster_cnn[s3]'")
  with pytest.raises(storage.StorageError, match="az:// is not supported"):
    storage.path("az://container/run")


def test_s3_holds_run_files(emulators, tiny_dataset, monkeypatch):
  fs = storage.filesystem(emulators["s3"])
  # Records: one ranged GET each, the same bytes as on local disk.
  from poster_cnn.data import records, tfrecord
  meta = records.read_metadata(emulators["s3"])
  remote = tfrecord.TFRecordSource(records.split_files(emulators["s3"], meta, "train"))
  local = tfrecord.TFRecordSource(records.split_files(tiny_dataset, meta, "train"))
  calls, read_range = [], storage.read_range
  monkeypatch.setattr(storage, "read_range",
                      lambda p, a, b: calls.append((p, a, b)) or read_range(p, a, b))
  assert [remote[i] for i in (0, 50, 95)] == [local[i] for i in (0, 50, 95)]
  assert len(calls) == 3
  run = run_dir.RunDir(f"s3://{BUCKET}/files")
  # Whole-or-nothing writes, metrics (staged, uploaded at close), evaluations.
  run_dir.atomic_write_json(run.thresholds_file(3), {"drama": 0.5})
  assert run.read_thresholds(3, ["drama"]).tolist() == [0.5]
  writer = logs.MetricWriter(run.path)
  writer.write(1, {"loss": 0.5})
  writer.close()
  writer = logs.MetricWriter(run.path)  # a resumed run extends the file
  writer.write(2, {"loss": 0.25})
  writer.close()
  assert [r["loss"] for r in logs.read_metrics(run.path)] == [0.5, 0.25]
  assert fs.ls(f"{BUCKET}/files/tensorboard")
  stem = run.evaluation(emulators["s3"], "test", 3)
  preds = {"scores": np.ones((2, 3), np.float32), "labels": np.zeros((2, 3), np.uint8),
           "index": np.arange(2)}
  run_dir.write_evaluation(stem, {"step": 3}, preds)
  summary, back = run_dir.read_evaluation(stem)
  assert summary == {"step": 3} and np.array_equal(back["scores"], preds["scores"])


def test_orbax_s3_points_only_s3_paths_at_the_s3_driver(monkeypatch):
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  from poster_cnn import orbax_s3
  monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
  monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
  others = ("/tmp/run/checkpoints/7/state", "gs://a-bucket/run/checkpoints/7/state")
  before = {p: ts_utils.build_kvstore_tspec(p, name="x") for p in others}
  orbax_s3.install()
  orbax_s3.install()  # idempotent: wrapped once
  assert {p: ts_utils.build_kvstore_tspec(p, name="x") for p in others} == before
  expected = {"driver": "s3", "bucket": "a-bucket", "path": "run/checkpoints/7/state",
              "endpoint": "http://127.0.0.1:9", "aws_region": "eu-west-3",
              "aws_credentials": {"type": "environment"}}
  url = "s3://a-bucket/run//checkpoints/7/state/"
  assert ts_utils.build_kvstore_tspec(url, name="x")["base"] == expected
  assert ts_utils.build_kvstore_tspec(url, name="x", use_ocdbt=False) == {
      **expected, "path": "run/checkpoints/7/state/x"}


def test_s3_checkpoints_resume_exactly_and_evaluate(emulators, tiny_dataset, tmp_path):
  c = tiny.get_config()
  c.data_dir, c.num_train_steps, c.checkpoint_every_steps = emulators["s3"], 8, 4
  c.eval_every_steps = 8
  workdir = f"s3://{BUCKET}/ckpt"
  train.train_and_evaluate(c, workdir)
  fs = storage.filesystem(workdir)
  # Written in place and committed with commit_success.txt; no local './s3:' folder.
  assert fs.exists(f"{workdir}/checkpoints/8/commit_success.txt")
  assert not os.path.exists("s3:") and not os.path.exists(os.path.join(REPO, "s3:"))
  uninterrupted = _final_params(workdir, 8)
  # The last save lost: the run resumes from step 4 and ends where it ended before.
  fs.rm(f"{workdir}/checkpoints/8", recursive=True)
  fs.invalidate_cache()
  train.train_and_evaluate(c, workdir)
  for a, b in zip(uninterrupted, _final_params(workdir, 8)):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  summary = evaluate.evaluate_checkpoint(workdir, step=8, split="test")
  assert summary["num_examples"] == 24
  poster = _a_poster(tiny_dataset, tmp_path)
  predictions, errors = predict.predict_files(workdir, [poster], step=8)
  assert not errors and len(predictions) == 1


def test_s3_checkpoints_are_refused_before_writing_when_orbax_cannot_be_taught(
    emulators, monkeypatch):
  from poster_cnn import orbax_s3
  monkeypatch.setattr(orbax_s3, "missing", lambda: "this orbax-checkpoint has no X")
  c = tiny.get_config()
  c.data_dir = emulators["s3"]
  with pytest.raises(storage.StorageError,
                     match="checkpoints cannot be written to s3:// here: .* has no X"):
    train.train_and_evaluate(c, f"s3://{BUCKET}/refused")
  fs = storage.filesystem(emulators["s3"])
  fs.invalidate_cache()
  assert not fs.exists(f"{BUCKET}/refused") and not os.path.exists("s3:")


def test_the_converter_publishes_to_gs_and_refuses_to_replace(emulators, tmp_path):
  from poster_cnn.data import convert, csv_rows, records, synthetic
  csv_path = synthetic.generate(tmp_path / "src", 40, width=32, num_workers=0)
  out = f"gs://{BUCKET}/converted"
  report = convert.convert(csv_path, out, vocabulary="min_count:1", num_workers=0,
                           splits="train:0.6,validation:0.2,test:0.2")
  assert report["output_dir"] == out
  meta = records.read_metadata(out)
  assert sum(s.num_examples for s in meta.splits.values()) == 40
  assert storage.path(f"{out}.report.json").exists()
  with pytest.raises(csv_rows.ConversionError, match="holds a dataset"):
    convert.convert(csv_path, out, vocabulary="min_count:1", num_workers=0)


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent XLA cache shared with the subprocesses: the three trainings compile once."""
  import jax
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  values = (str(tmp_path / "xla_cache"), 0, 0)
  for n, v in zip(names, values):
    jax.config.update(n, v)
  yield {n.upper(): str(v) for n, v in zip(names, values)}
  for n, v in saved.items():
    jax.config.update(n, v)


def test_gs_workdir_trains_survives_sigkill_resumes_exactly_evaluates_and_predicts(
    emulators, tiny_dataset, tmp_path, compilation_cache):
  steps, every = 8, 4
  args = (f"--config.num_train_steps={steps}", f"--config.checkpoint_every_steps={every}",
          f"--config.eval_every_steps={steps}", "--config.num_workers=0")
  env = {**emulators["env"], **compilation_cache}
  # The uninterrupted run, here, on gs:// data.
  c = tiny.get_config()
  c.data_dir, c.num_train_steps, c.checkpoint_every_steps = emulators["gs"], steps, every
  c.eval_every_steps = steps
  straight = f"gs://{BUCKET}/straight"
  train.train_and_evaluate(c, straight)
  # Killed, then resumed, in subprocesses; its data on s3://, so both stores' reads count.
  killed = f"gs://{BUCKET}/killed"
  fs = storage.filesystem(killed)
  proc = subprocess.Popen(_cli(killed, emulators["s3"], *args), env=env,
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    fs.invalidate_cache()
    if fs.exists(f"{killed}/checkpoints/{every}/commit_success.txt"):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  fs.invalidate_cache()
  assert not fs.exists(f"{killed}/checkpoints/{steps}")
  done = subprocess.run(_cli(killed, emulators["s3"], *args), env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from checkpoint at step" in done.stderr
  for a, b in zip(_final_params(straight, steps), _final_params(killed, steps)):
    for x, y in zip(a, b):  # params, then batch statistics
      np.testing.assert_array_equal(x, y)

  # Evaluate (outputs into the gs:// workdir) and predict (output to gs://).
  summary = evaluate.evaluate_checkpoint(killed, step=steps, split="test")
  assert summary["num_examples"] == 24
  stem = run_dir.RunDir(killed).evaluation(emulators["s3"], "test", steps)
  assert run_dir.evaluation_exists(stem)
  poster = _a_poster(tiny_dataset, tmp_path)
  predictions, errors = predict.predict_files(killed, [poster], step=steps)
  assert not errors
  out = f"gs://{BUCKET}/predictions.json"
  predict.check_output(out)
  predict.write_output(out, predict.format_predictions(predictions, "json"))
  assert json.loads(storage.path(out).read_text())[0]["path"] == poster
  rows = logs.read_metrics(killed)
  assert rows[-1]["step"] == steps and rows[-1]["split"] == "validation"
  from poster_cnn import report
  out_dir = report.write_report(killed, step=steps, split="test")
  assert out_dir.startswith(f"{killed}/reports/")
  assert "<html" in (storage.path(out_dir) / "report.html").read_text()
