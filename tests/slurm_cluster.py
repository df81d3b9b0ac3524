"""A one-node Slurm on localhost for tests: munged, slurmctld and slurmd in a temp dir.

Debian's slurm-wlm and munge packages (.ci/run installs them); the daemons run as
root with no cgroups and no systemd, on free ports, with their own munge socket, so
nothing under /etc/slurm or /run/munge is used or changed. `unavailable()` names
why a machine cannot run it (tests skip with that reason).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol",
            "scancel", "sinfo", "runuser")
MUNGE_KEY = "/etc/munge/munge.key"


def unavailable() -> str | None:
  """Why Slurm cannot run here, or None."""
  missing = [b for b in BINARIES if shutil.which(b) is None]
  if missing:
    return (f"{', '.join(missing)} not found: install slurm-wlm and munge "
            "(apt-get install slurm-wlm munge; .ci/run does)")
  if os.geteuid() != 0:
    return "slurmd and munged must be started as root"
  try:
    pwd.getpwnam("munge")
  except KeyError:
    return "no 'munge' user (the munge package creates it)"
  if not os.path.exists(MUNGE_KEY):
    return f"{MUNGE_KEY} missing (the munge package creates it)"
  host = socket.gethostname().split(".")[0]
  try:
    socket.gethostbyname(host)
  except OSError:
    return f"host name {host!r} does not resolve (jax finds the coordinator by it)"
  return None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  """Start with `start()`, stop with `stop()`; `env` is what clients need (SLURM_CONF)."""

  def __init__(self, cpus: int = 4):
    self.cpus = cpus
    self.host = socket.gethostname().split(".")[0]
    # mkdtemp is 0700; munged wants its socket directory reachable by everyone.
    self.root = tempfile.mkdtemp(prefix="poster_cnn_slurm_")
    os.chmod(self.root, 0o755)
    self.conf = os.path.join(self.root, "slurm.conf")
    self.munge_socket = os.path.join(self.root, "munge", "socket")
    self.env = {**os.environ, "SLURM_CONF": self.conf}
    self._daemons: list[subprocess.Popen] = []

  def _write_conf(self) -> None:
    r = self.root
    for d in ("state", "spool", "log"):
      os.makedirs(os.path.join(r, d))
    # cred_expire=10: a requeued job may run again after ~11 s instead of ~120 s.
    # config_overrides: take CPUs from here, so two 2-task jobs fit on a 2-core host.
    conf = f"""\
ClusterName=poster_cnn_test
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
    with open(self.conf, "w") as f:
      f.write(conf)

  def start(self, timeout: float = 60) -> None:
    self._write_conf()
    munge_dir = os.path.dirname(self.munge_socket)
    os.makedirs(munge_dir)
    shutil.chown(munge_dir, "munge", "munge")
    os.chmod(munge_dir, 0o755)
    subprocess.run(
        ["runuser", "-u", "munge", "--", shutil.which("munged"), f"--socket={self.munge_socket}",
         f"--pid-file={munge_dir}/pid", f"--log-file={munge_dir}/log",
         f"--seed-file={munge_dir}/seed"], check=True, capture_output=True, timeout=30)
    logs = os.path.join(self.root, "log")
    for daemon in ("slurmctld", "slurmd"):
      with open(os.path.join(logs, f"{daemon}.out"), "w") as out:
        self._daemons.append(subprocess.Popen([daemon, "-D"], env=self.env, stdout=out,
                                              stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True,
                             text=True).stdout.strip()
      if state == "idle":
        return
      if any(p.poll() is not None for p in self._daemons):
        break
      time.sleep(0.5)
    raise RuntimeError(f"Slurm did not come up (node state {state!r}):\n{self.logs()}")

  def logs(self) -> str:
    out = []
    for name in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
      path = os.path.join(self.root, "log", name)
      if os.path.exists(path):
        with open(path) as f:
          out.append(f"--- {name}\n" + "".join(f.readlines()[-20:]))
    return "\n".join(out)

  def stop(self) -> None:
    subprocess.run(["scancel", "--full", f"--user={pwd.getpwuid(os.geteuid()).pw_name}"],
                   env=self.env, capture_output=True, timeout=30)
    for p in reversed(self._daemons):
      p.terminate()
    for p in self._daemons:
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    subprocess.run([shutil.which("munged"), f"--socket={self.munge_socket}", "--stop"],
                   capture_output=True, timeout=30)
    shutil.rmtree(self.root, ignore_errors=True)

  # ------------------------------------------------------------------ jobs

  def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60,
                          **kwargs)

  def job_state(self, job: int) -> str:
    """PENDING, RUNNING, COMPLETED, FAILED, ... ('' if slurmctld forgot the job)."""
    out = self.run("scontrol", "show", "job", str(job)).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else ""

  def restarts(self, job: int) -> int:
    m = re.search(r"Restarts=(\d+)", self.run("scontrol", "show", "job", str(job)).stdout)
    return int(m.group(1)) if m else -1
