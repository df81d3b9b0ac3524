"""Joining a multi-process JAX job: `initialize()` from the command line's flags.

jax.distributed.initialize() finds the coordinator, the process count and this
process's index itself on SLURM, Cloud TPU pods and a few other clusters. What it
gets wrong on SLURM is which GPUs a process drives: given no `local_device_ids`,
it restricts every process to GPU number SLURM_LOCALID, so one task per node on an
8-GPU node uses GPU 0 only, and one task per GPU with Slurm's own binding
(`--gpus-per-task=1`, which leaves each task one visible GPU, numbered 0 or not)
asks for a GPU the task cannot see. `slurm_local_device_ids` works out the right
ones from what Slurm allocated; launch/slurm.sh documents both layouts.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping

import jax
from absl import flags, logging
from jax.experimental import multihost_utils

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Call jax.distributed.initialize(): 'auto' does so when a cluster environment "
    "(SLURM with several tasks, Cloud TPU pod, JAX_COORDINATOR_ADDRESS) or "
    "--coordinator_address is given.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters JAX does not "
    "detect by itself (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")


def cluster_detected(env: Mapping[str, str], coordinator_address: str | None = None) -> bool:
  """Whether `env` (os.environ) describes a job of several processes."""
  return (coordinator_address is not None or int(env.get("SLURM_NTASKS", "1")) > 1
          or "JAX_COORDINATOR_ADDRESS" in env
          or "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"])


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
  """This node's task count from SLURM_STEP_TASKS_PER_NODE ('2(x3),1' style)."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if not spec or "SLURM_NODEID" not in env:
    return None
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if m is None:
      return None
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  node = int(env["SLURM_NODEID"])
  return counts[node] if node < len(counts) else None


def slurm_local_device_ids(env: Mapping[str, str], num_node_gpus: int | None = None
                           ) -> list[int] | None:
  """The GPU ordinals (as this process's CUDA sees them) a SLURM task should drive.

  - Slurm bound GPUs to the task (CUDA_VISIBLE_DEVICES or ROCR_VISIBLE_DEVICES set,
    as `--gpus-per-node` / `--gpus-per-task` do): every GPU the task sees, numbered
    0..n-1 since CUDA renumbers the visible ones.
  - No binding: the node's GPUs (`num_node_gpus`, by default counted from
    /dev/nvidia[0-9]*) split evenly between the node's tasks by SLURM_LOCALID.
  Returns None outside SLURM or when there is nothing to split (a CPU job).
  """
  if "SLURM_LOCALID" not in env:
    return None
  for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
    visible = [d for d in env.get(var, "").split(",") if d.strip()]
    if visible:
      return list(range(len(visible)))
  if num_node_gpus is None:
    num_node_gpus = len(glob.glob("/dev/nvidia[0-9]*"))
  tasks = _tasks_on_this_node(env) or 1
  per_task = num_node_gpus // tasks
  if per_task == 0:
    return None
  local = int(env["SLURM_LOCALID"])
  return list(range(local * per_task, (local + 1) * per_task))


def initialize() -> None:
  """Joins the job the flags and the environment describe, if any."""
  env = os.environ
  mode = _DISTRIBUTED.value
  if mode == "no" or (mode == "auto" and not cluster_detected(env, _COORDINATOR.value)):
    return
  # CPU processes exchange arrays through gloo; GPU and TPU backends ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  local_ids = slurm_local_device_ids(env) if "SLURM_JOB_ID" in env else None
  if local_ids is not None:
    logging.info("SLURM task %s on node %s drives local GPUs %s", env.get("SLURM_PROCID"),
                 env.get("SLURMD_NODENAME", "?"), local_ids)
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS"),
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      local_device_ids=local_ids)
  if jax.default_backend() == "cpu" and jax.process_count() > 1:
    # gloo gives its connections 30 s to form at the first collective, and processes
    # can reach that one minutes apart (a loaded host, a restore, a compile); made
    # now, while initialize() has just aligned them, they wait as long as it takes.
    multihost_utils.sync_global_devices("poster_cnn_gloo_connect")
