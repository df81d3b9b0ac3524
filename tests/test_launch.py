"""The launch scripts' dry runs print the command each would run."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, **env):
  out = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args],
                       env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True,
                       text=True, check=True, timeout=60)
  return out.stdout


def test_local():
  out = _dry("local.sh", "--config=configs/tiny.py", "--workdir=/tmp/run")
  assert "bin/poster-cnn --config=configs/tiny.py --workdir=/tmp/run" in out


def test_local_multidevice_sets_the_device_count():
  out = _dry("local_multidevice.sh", "4", "--config=configs/tiny.py", "--workdir=/tmp/run")
  assert "--xla_force_host_platform_device_count=4" in out and "JAX_PLATFORMS=cpu" in out
  assert "--workdir=/tmp/run" in out


def test_slurm_batch_script():
  out = _dry("slurm.sh", "--config=configs/paper.py", "--workdir=/shared/run",
             NODES="4", GPUS_PER_NODE="8", PARTITION="gpu")
  assert out.startswith("#!/usr/bin/env bash")
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu"):
    assert line in out
  assert "srun" in out and "--distributed=yes --config=configs/paper.py --workdir=/shared/run" in out


def test_tpu_vm_runs_on_every_worker():
  out = _dry("tpu_vm.sh", "--config=configs/paper.py", "--workdir=/mnt/run",
             TPU_NAME="pod", ZONE="us-central2-b", SETUP="1")
  lines = out.strip().splitlines()
  assert len(lines) == 3  # copy, install, train
  assert all("--worker=all" in l and "pod" in l and "--zone=us-central2-b" in l for l in lines)
  assert "poster-cnn\\ --distributed=auto" in lines[-1]


def test_tpu_vm_requires_a_name():
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--workdir=x"],
                       env={**os.environ, "DRY_RUN": "1", "ZONE": "z"}, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode != 0 and "TPU_NAME" in out.stderr
