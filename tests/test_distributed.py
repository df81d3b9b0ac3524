"""Which GPUs each SLURM task hands jax (poster_cnn/distributed.py), from SLURM's variables.

What jax does with them is checked through jax's own cluster auto-detection
(jax/_src/clusters): the `local_device_ids` it returns become the process's
visible devices (`jax_cuda_visible_devices`), as ordinals into CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from jax._src import clusters

from poster_cnn import distributed


def _task_env(localid: int, tasks_per_node: int, visible: str | None, nodeid: int = 0,
              nodes: int = 2) -> dict:
  """The variables srun sets in one task (the ones jax and distributed.py read)."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]",
         "SLURM_NTASKS": str(tasks_per_node * nodes),
         "SLURM_PROCID": str(nodeid * tasks_per_node + localid),
         "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
         "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})"}
  if visible is not None:
    env["CUDA_VISIBLE_DEVICES"] = visible
  return env


def _jax_given(monkeypatch, env: dict, local_device_ids) -> list[int] | None:
  """The local_device_ids jax.distributed.initialize would go on with."""
  for k in list(os.environ):
    if k.startswith(("SLURM_", "CUDA_VISIBLE", "OMPI_", "PMI_", "TPU_")):
      monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  _, n, pid, ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, local_device_ids, None, None)
  assert (n, pid) == (int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
  return ids


def _physical(env: dict, ids: list[int]) -> list[str]:
  """The node's GPUs a process with visible ordinals `ids` drives."""
  visible = env.get("CUDA_VISIBLE_DEVICES")
  return [visible.split(",")[i] if visible else str(i) for i in ids]


@pytest.mark.parametrize("gpus", [1, 8])
def test_one_task_per_node_drives_every_gpu_of_its_node(monkeypatch, gpus):
  # sbatch --ntasks-per-node=1 --gpus-per-node=G: the task sees all G GPUs.
  env = _task_env(0, 1, ",".join(map(str, range(gpus))), nodeid=1)
  ids = distributed.slurm_local_device_ids(env)
  assert _jax_given(monkeypatch, env, ids) == list(range(gpus))
  assert _physical(env, ids) == [str(g) for g in range(gpus)]
  # Left to itself, jax would restrict the task to GPU SLURM_LOCALID = 0.
  assert _jax_given(monkeypatch, env, None) == [0]


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("constrained", [False, True])
def test_one_task_per_gpu_drives_its_own_gpu(monkeypatch, gpus, constrained):
  # sbatch --ntasks-per-node=G --gpus-per-task=1: Slurm binds one GPU to each task,
  # renumbered 0 where cgroups constrain devices, its node number where not.
  used = []
  for local in range(gpus):
    env = _task_env(local, gpus, "0" if constrained else str(local))
    ids = distributed.slurm_local_device_ids(env)
    assert _jax_given(monkeypatch, env, ids) == [0]
    if not constrained:  # (constrained, the cgroup decides which GPU "0" is)
      used += _physical(env, ids)
  assert constrained or used == [str(g) for g in range(gpus)]
  if gpus > 1:  # jax alone would ask task 3 for visible GPU 3 of the 1 it sees
    env = _task_env(3, gpus, "3")
    assert _jax_given(monkeypatch, env, None) == [3]


@pytest.mark.parametrize("tasks", [1, 2, 8])
def test_without_slurm_gpu_binding_the_node_gpus_are_split_between_its_tasks(tasks):
  # No GRES on the cluster: every task sees all 8 GPUs; each takes its share.
  shares = [distributed.slurm_local_device_ids(_task_env(local, tasks, None),
                                               num_node_gpus=8)
            for local in range(tasks)]
  assert sorted(sum(shares, [])) == list(range(8))
  assert all(len(s) == 8 // tasks for s in shares)


def test_cpu_jobs_and_non_slurm_processes_leave_devices_alone():
  assert distributed.slurm_local_device_ids(_task_env(1, 2, None), num_node_gpus=0) is None
  assert distributed.slurm_local_device_ids({}) is None


def test_tasks_per_node_spec_with_repeats():
  env = {**_task_env(0, 1, None), "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"}
  shares = [distributed.slurm_local_device_ids({**env, "SLURM_LOCALID": str(i)},
                                               num_node_gpus=8) for i in range(2)]
  assert shares == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_cluster_detection():
  assert not distributed.cluster_detected({})
  assert not distributed.cluster_detected({"SLURM_NTASKS": "1"})
  assert distributed.cluster_detected({"SLURM_NTASKS": "2"})
  assert distributed.cluster_detected({}, coordinator_address="h:1")
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a"})


_LATE = """
import sys, time
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from poster_cnn import distributed
flags.FLAGS(sys.argv)
distributed.initialize()
import jax
if jax.process_index() == 1:
  time.sleep(40)  # a slow restore or compile on one host
print(multihost_utils.process_allgather(np.full(2, jax.process_index())).tolist())
"""


def test_cpu_processes_may_reach_their_first_collective_minutes_apart():
  # gloo gives its connections 30 s to form at the first collective unless
  # initialize() has made them already.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-c", _LATE, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"], env={**os.environ, "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "[[0, 0], [1, 1]]"
