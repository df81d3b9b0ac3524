"""A run checkpointed by 2 processes resumes on 1 process of 1 or 4 devices.

The train state is replicated, so it restores onto any mesh; the data iterators'
states (one per process, poster_cnn/data/iterator_state.py) are rebuilt for the new
process count. With 96 training examples (a multiple of 1, 2 and 4) and no dropout,
the resumed runs see the batches an uninterrupted run sees: each step's loss is the
uninterrupted run's to 5e-4 relative, and the parameters to 1e-3: the device count
alone (sums in another order) moves them by 2.7e-4 after 12 steps (two uninterrupted
runs on 1 and 2 devices, measured).
"""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from poster_cnn import logs
from poster_cnn.data import iterator_state, pipeline

from test_train import _cli, _final_params, REPO

ARGS = ("--config.eval_every_steps=6", "--config.log_every_steps=1", "--config.num_workers=0",
        "--config.model.conv_dropout=(0.,0.,0.,0.)", "--config.model.dense_dropout=0.",
        "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.002",
        "--config.optimizer.momentum=0.")


def _env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _train(workdir, data, steps: int, devices: int) -> str:
  proc = subprocess.run(_cli(workdir, data, *ARGS, f"--config.num_train_steps={steps}"),
                        env=_env(devices), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_two_process_checkpoint_resumes_on_one_and_on_four_devices(tiny_dataset, tmp_path):
  straight = tmp_path / "straight"
  _train(straight, tiny_dataset, 12, devices=2)

  two = tmp_path / "two"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      _cli(two, tiny_dataset, *ARGS, "--config.num_train_steps=6",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
      env=_env(1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  assert sorted(os.listdir(two / "checkpoints" / "6" / "data_iter"))[-2:] == [
      "process_0-of-2.json", "process_1-of-2.json"]

  expected = _final_params(straight, 12)
  losses = {r["step"]: r["loss"] for r in logs.read_metrics(straight) if r["split"] == "train"}
  for devices in (1, 4):
    resumed = tmp_path / f"resumed_on_{devices}"
    shutil.copytree(two, resumed)
    log = _train(resumed, tiny_dataset, 12, devices=devices)
    assert "resumed from checkpoint at step 6" in log
    assert "was saved by 2 process(es); this run has 1 process(es)" in log
    assert not (resumed / "checkpoints_broken").exists()
    after = {r["step"]: r["loss"] for r in logs.read_metrics(resumed) if r["split"] == "train"}
    assert sorted(after) == list(range(1, 13))
    for step in range(7, 13):
      assert after[step] == pytest.approx(losses[step], rel=5e-4), (devices, step)
    for a, b in zip(expected, _final_params(resumed, 12)):
      for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)


_ITERATE = """
from poster_cnn.data import iterator_state, pipeline
if __name__ == "__main__":
  it = iter(pipeline.train_dataset({data!r}, "train", global_batch_size=8,
                                   image=pipeline.ImageOptions(16, 16), seed=0,
                                   num_workers={workers}, process_index=1, process_count=2))
  fresh = it.get_state()
  for n in range(1, 6):
    next(it)
    assert it.get_state() == iterator_state.state_after(fresh, n), (n, it.get_state())
  if {workers}:
    it.close()
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_state_after_is_what_grain_reports_after_that_many_batches(tiny_dataset, workers):
  # In a subprocess: grain's worker processes and the test runner do not mix.
  subprocess.run([sys.executable, "-c", _ITERATE.format(data=tiny_dataset, workers=workers)],
                 env=_env(1), cwd=REPO, check=True, capture_output=True, timeout=300)


def test_unknown_layouts_are_refused():
  with pytest.raises(ValueError, match="unknown grain iterator state layout"):
    iterator_state.state_after({"position": 3}, 2)
  assert iterator_state.same_layout({"next_index": 1}, {"next_index": 9})
  assert not iterator_state.same_layout({"next_index": 1}, {"iterators_in_use_states": []})


def test_another_topology_is_not_mistaken_for_a_broken_checkpoint(tiny_dataset, tmp_path):
  # A one-process checkpoint relabelled as two processes' (what grain writes for them).
  from test_train import _config
  from poster_cnn import checkpoint, train
  c = _config(tiny_dataset, num_train_steps=3, eval_every_steps=3)
  train.train_and_evaluate(c, str(tmp_path))
  saved = tmp_path / "checkpoints" / "3" / "data_iter"
  state = (saved / "process_0-of-1.json").read_text()
  (saved / "process_0-of-1.json").unlink()
  for i in range(2):
    (saved / f"process_{i}-of-2.json").write_text(state)

  it = iter(pipeline.train_dataset(tiny_dataset, "train", global_batch_size=8,
                                   image=train.image_options(c), seed=c.seed))
  mesh = train.create_mesh()
  _, abstract, _ = train.state_factory(c, 4, 3, mesh)
  manager = checkpoint.create_manager(tmp_path)
  with pytest.raises(checkpoint.TopologyChanged, match="saved by 2 process"):
    checkpoint.restore_latest(manager, abstract, it)
  assert manager.all_steps() == [3] and not (tmp_path / "checkpoints_broken").exists()
  step, restored = checkpoint.restore_latest(manager, abstract, it, batch_size=8)
  assert step == 3 and int(restored.step) == 3 and it.get_state() == {"next_index": 3}
