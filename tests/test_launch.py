"""The launch scripts' dry runs print the command each would run."""

import os
import socket
import subprocess
import tarfile
import time

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
               "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):
    assert line in out
  assert "srun" in out and (f"--distributed=yes --config={REPO}/configs/paper.py "
                            "--workdir=/shared/run") in out
  assert "scontrol requeue" in out and "trap" in out


def test_slurm_one_task_per_gpu():
  out = _dry("slurm.sh", "--config=configs/paper.py", "--workdir=/r", GPUS_PER_NODE="8",
             TASKS_PER_NODE="gpu")
  assert "#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-task=1\n" in out
  assert "--gpus-per-node" not in out


def test_slurm_cpu_job_asks_for_no_gpus():
  out = _dry("slurm.sh", "--config=configs/tiny.py", "--workdir=/r", GPUS_PER_NODE="0",
             TASKS_PER_NODE="2")
  assert "#SBATCH --ntasks-per-node=2" in out and "gpus" not in out


def test_slurm_paths_do_not_depend_on_the_submit_directory(tmp_path):
  out = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "slurm.sh"), "--config=configs/tiny.py",
       "--workdir=run", "--config.data_dir=data"], cwd=tmp_path,
      env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=True,
      timeout=60).stdout
  assert f"--config={REPO}/configs/tiny.py" in out
  assert f"--workdir={tmp_path}/run" in out and f"--config.data_dir={tmp_path}/data" in out


def test_slurm_rejects_a_missing_config(tmp_path):
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sh"),
                        "--config=configs/nope.py", "--workdir=r"], cwd=tmp_path,
                       env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2 and "configs/nope.py" in out.stderr


def _words(line: str) -> list[str]:
  """A printed command line (bash %q quoting, $'..' included) back into its arguments."""
  out = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True,
                       text=True, check=True, timeout=30).stdout
  return out.split("\0")[:-1]


def test_tpu_vm_runs_on_every_worker():
  out = _dry("tpu_vm.sh", "--config=configs/paper.py", "--workdir=/mnt/run",
             TPU_NAME="pod", ZONE="us-central2-b", SETUP="1")
  commands = [_words(l) for l in out.strip().splitlines()]
  assert [c[:2] for c in commands] == [["git", "-C"], ["gcloud", "compute"],
                                       ["gcloud", "compute"], ["gcloud", "compute"]]
  for c in commands[1:]:  # copy, install, train: on every worker of the TPU
    assert "--worker=all" in c and "--zone=us-central2-b" in c
    assert "pod" in c or "pod:~/poster_cnn.tar.gz" in c
  assert "--distributed=auto --config=configs/paper.py --workdir=/mnt/run" in commands[-1][-1]


def _tpu_commands(tmp_path, *args, **env) -> list[list[str]]:
  out = _dry("tpu_vm.sh", *args, TPU_NAME="pod", ZONE="z", TMPDIR=str(tmp_path), **env)
  return [_words(l) for l in out.strip().splitlines()]


def test_tpu_vm_setup_ships_the_package_and_installs_a_fresh_venv(tmp_path):
  archive, _, install, _ = _tpu_commands(tmp_path, "--workdir=/mnt/run", SETUP="1")
  subprocess.run(archive, check=True, timeout=120)  # git archive: local, read-only
  with tarfile.open(archive[archive.index("-o") + 1]) as tar:
    names = tar.getnames()
  assert "poster_cnn/pyproject.toml" in names and "poster_cnn/poster_cnn/train.py" in names
  assert "poster_cnn/configs/tiny.py" in names
  assert not any(n.split("/")[1] in (".venv", "runs", ".git") for n in names if "/" in n)
  script = install[-1].removeprefix("--command=")
  assert "-m venv .venv" in script and "-e . 'jax[tpu]'" in script
  assert "sys.version_info < (3, 11)" in script and "uv venv -q --python 3.11" in script
  assert "! -name logs -exec rm -rf" in script  # a fresh tree and venv; old logs kept


def test_tpu_vm_training_survives_the_ssh_session(tmp_path):
  # The command each worker runs, run here under a fake home whose poster-cnn
  # writes for a while after the shell that started it (the ssh session) is gone.
  [train] = _tpu_commands(tmp_path, "--config=configs/paper.py", "--workdir=/mnt/run")
  home = tmp_path / "home"
  fake = home / "poster_cnn" / ".venv" / "bin" / "poster-cnn"
  fake.parent.mkdir(parents=True)
  fake.write_text("#!/usr/bin/env bash\nsleep 1; echo \"sid $(ps -o sid= $$) args $*\"\n")
  fake.chmod(0o755)
  shell = subprocess.run(["bash", "-c", train[-1].removeprefix("--command=")],
                         env={**os.environ, "HOME": str(home)}, capture_output=True,
                         text=True, timeout=30, check=True)
  host = socket.gethostname()
  assert f"{host}: training as pid" in shell.stdout
  pid = int((home / "poster_cnn" / "logs" / f"{host}.pid").read_text())
  log = home / "poster_cnn" / "logs" / f"{host}.log"
  deadline = time.monotonic() + 20
  while "args" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
    time.sleep(0.1)
  sid, args = log.read_text().split(" args ")
  assert int(sid.split()[1]) == pid  # its own session: no SIGHUP when ssh closes
  assert args.strip() == "--distributed=auto --config=configs/paper.py --workdir=/mnt/run"


def test_tpu_vm_stop_sends_sigterm():
  out = _dry("tpu_vm.sh", TPU_NAME="pod", ZONE="z", STOP="1")
  assert "kill -TERM $(cat logs/$(hostname).pid)" in _words(out.strip())[-1]


def test_tpu_vm_requires_a_name():
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--workdir=x"],
                       env={**os.environ, "DRY_RUN": "1", "ZONE": "z"}, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode != 0 and "TPU_NAME" in out.stderr
