"""launch/slurm.sh against a real Slurm on localhost (tests/slurm_cluster.py).

Two 2-task CPU jobs train the tiny config side by side: one straight through, one
stopped twice and resumed each time -- `scancel --signal=TERM` then `scontrol
requeue`, and the USR1 that `--signal=B:USR1@...` sends the batch script near its
time limit, on which the script requeues the job itself. Both must end with the
same parameters, bit for bit, and the same metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import slurm_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60


@pytest.fixture(scope="module")
def slurm():
  reason = slurm_cluster.unavailable()
  if reason:
    pytest.skip(f"no Slurm: {reason}")
  cluster = slurm_cluster.Cluster(cpus=4)
  try:
    cluster.start()
  except (RuntimeError, subprocess.SubprocessError) as e:
    cluster.stop()
    pytest.skip(f"Slurm would not start here: {e}")
  yield cluster
  cluster.stop()


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, f"{module} {args}\n{proc.stdout}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def posters(tmp_path_factory) -> str:
  """poster_cnn's own synthetic posters, converted: train 96 / validation 32 / test 32."""
  tmp = tmp_path_factory.mktemp("slurm_posters")
  src, data = tmp / "src", tmp / "data"
  _run("poster_cnn.data.synthetic", f"--out_dir={src}", "--num_posters=160", "--width=32",
       "--num_workers=1")
  _run("poster_cnn.data.convert", f"--csv={src}/MovieGenre.csv", f"--image_dir={src}/posters",
       f"--output_dir={data}", "--vocabulary=paper", "--num_workers=1",
       "--splits=train:0.6,validation:0.2,test:0.2")
  return str(data)


def _submit(cluster, tmp_path, name: str, data: str, env: dict) -> tuple[int, str, str]:
  workdir, logs = tmp_path / name, tmp_path / "slurm_logs"
  # Submitted from tmp_path: the relative --config must still find configs/tiny.py.
  out = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "slurm.sh"), "--config=configs/tiny.py",
       f"--config.data_dir={data}", f"--workdir={name}", f"--config.num_train_steps={STEPS}",
       "--config.eval_every_steps=20", "--config.log_every_steps=1"],
      cwd=tmp_path, capture_output=True, text=True, timeout=60,
      env={**env, "JOB_NAME": name, "NODES": "1", "TASKS_PER_NODE": "2", "GPUS_PER_NODE": "0",
           "CPUS_PER_TASK": "1", "TIME": "30", "LOG_DIR": str(logs),
           # jax's port for SLURM is derived from the job id: pick a free one instead.
           "JAX_COORDINATOR_PORT": str(slurm_cluster.free_port())})
  assert out.returncode == 0, out.stderr
  job = int(re.search(r"Submitted batch job (\d+)", out.stdout).group(1))
  return job, str(workdir), str(logs / f"{name}-{job}.out")


def _wait(what: str, predicate, cluster, log: str, timeout: float = 600):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  text = open(log).read()[-4000:] if os.path.exists(log) else "(no job log)"
  pytest.fail(f"timed out waiting for {what}\n{text}\n{cluster.logs()}")


def _train_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l)["step"] for l in f if l.endswith("\n") and '"split": "train"' in l]


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows]


def _final_state(workdir: str) -> list[np.ndarray]:
  """The leaves of the last checkpoint's train state, restored onto this process's CPU."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  checkpointer = ocp.StandardCheckpointer()
  # Saved across two processes' devices: restore onto one, as a target tree says.
  one = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        checkpointer.metadata(path).item_metadata.tree)
  return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


def test_preempted_and_requeued_job_ends_where_an_uninterrupted_one_does(slurm, posters,
                                                                         tmp_path):
  env = {**slurm.env, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env.pop("XLA_FLAGS", None)
  straight, straight_dir, straight_log = _submit(slurm, tmp_path, "straight", posters, env)
  job, workdir, log = _submit(slurm, tmp_path, "preempted", posters, env)
  done = lambda j: lambda: slurm.job_state(j) in ("COMPLETED", "FAILED", "CANCELLED", "")

  # 1. scancel --signal=TERM reaches the training processes: save, exit, job done.
  _wait("the first steps", lambda: len(_train_steps(workdir)) >= 2, slurm, log)
  assert slurm.run("scancel", "--signal=TERM", str(job)).returncode == 0
  _wait("the job to stop", done(job), slurm, log)
  assert slurm.job_state(job) == "COMPLETED", open(log).read()[-3000:]
  [first_stop] = map(int, re.findall(r"stopping at step (\d+) after preemption",
                                     open(log).read())[:1])
  assert 2 <= first_stop < STEPS
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(first_stop)))

  # 2. scontrol requeue resumes it; then the time-limit signal to the batch script.
  assert slurm.run("scontrol", "requeue", str(job)).returncode == 0
  _wait("the requeued job's steps",
        lambda: max(_train_steps(workdir), default=0) >= first_stop + 2, slurm, log)
  assert slurm.run("scancel", "--batch", "--signal=USR1", str(job)).returncode == 0
  _wait("the job to requeue itself and finish",
        lambda: slurm.restarts(job) == 2 and done(job)(), slurm, log)
  _wait("the straight job", done(straight), slurm, straight_log)
  text = open(log).read()
  assert slurm.job_state(job) == "COMPLETED" and slurm.job_state(straight) == "COMPLETED", text
  stops = [int(s) for s in re.findall(r"stopping at step (\d+) after preemption", text)]
  assert len(stops) == 4 and stops[0] == stops[1] == first_stop and stops[2] == stops[3]
  assert first_stop < stops[2] < STEPS, "the second stop must come before the end"
  assert "requeueing job" in text
  assert len(re.findall(rf"resumed from checkpoint at step {first_stop}\b", text)) == 2
  assert len(re.findall(rf"resumed from checkpoint at step {stops[2]}\b", text)) == 2

  # One set of logs: process 0 alone wrote metrics, each step once.
  steps = _train_steps(workdir)
  assert steps == list(range(1, STEPS + 1))
  assert _metrics(workdir) == _metrics(straight_dir)
  # Both processes wrote their iterator position; orbax one state.
  iter_files = os.listdir(os.path.join(workdir, "checkpoints", str(STEPS), "data_iter"))
  assert len([f for f in iter_files if "process" in f]) == 2, iter_files
  a, b = _final_state(straight_dir), _final_state(workdir)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)  # bitwise: same topology, same batches
