#!/usr/bin/env bash
# Multi-node training on SLURM; every process joins one jax.distributed job from
# SLURM's environment (poster-cnn --distributed=yes).
#   NODES=2 GPUS_PER_NODE=8 PARTITION=gpu TIME=24:00:00 \
#     bash launch/slurm.sh --config=configs/paper.py --config.data_dir=DATA --workdir=RUN
#
# Task layout (TASKS_PER_NODE):
#   1 (default)      one process per node drives all GPUS_PER_NODE GPUs of its node
#                    (--ntasks-per-node=1 --gpus-per-node=G);
#   gpu              one process per GPU (--ntasks-per-node=G --gpus-per-task=1);
#   N (a number)     N processes per node, sharing the node's GPUs evenly
#                    (GPUS_PER_NODE=0: a CPU job of N processes per node).
# poster_cnn/distributed.py gives each process the GPUs Slurm bound to it (jax on its
# own would give every process only GPU number SLURM_LOCALID).
#
# Preemption and time limits: the job is --requeue'able. SIGNAL_SECONDS (default 300)
# before the time limit Slurm sends USR1 to this batch script, which passes TERM to the
# training processes: they agree on a step, save a checkpoint, exit, and the script
# requeues the job, which resumes from that checkpoint. `scancel --signal=TERM JOB`
# (the training steps only) saves and stops without requeueing; `scontrol requeue JOB`
# resumes it later. A scheduler preemption with PreemptMode=REQUEUE signals and
# requeues by itself.
#
# Relative paths in --config, --workdir and --config.data_dir are made absolute here
# (--config also falls back to this checkout's configs/), so the job does not depend on
# the directory it is submitted from. DATA and RUN must be on a file system every node
# sees, and so must this checkout and its virtual environment (bash launch/tests.sh or
# launch/local.sh creates it).
# DRY_RUN=1 prints the batch script instead of submitting it.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
NODES="${NODES:-1}"; GPUS_PER_NODE="${GPUS_PER_NODE:-8}"; TASKS_PER_NODE="${TASKS_PER_NODE:-1}"
JOB_NAME="${JOB_NAME:-poster_cnn}"; TIME="${TIME:-24:00:00}"; SIGNAL_SECONDS="${SIGNAL_SECONDS:-300}"
LOG_DIR="${LOG_DIR:-$REPO/runs/slurm}"
[ $# -gt 0 ] || { echo "usage: slurm.sh [poster-cnn flags]" >&2; exit 2; }

absolute() { case "$1" in /*|*://*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
args=()
for arg in "$@"; do
  case "$arg" in
    --config=*)
      path="${arg#--config=}"
      if [ -e "$path" ] || [[ "$path" == /* ]]; then path="$(absolute "$path")"
      elif [ -e "$REPO/$path" ]; then path="$REPO/$path"
      else echo "error: --config=$path: no such file here or in $REPO" >&2; exit 2; fi
      arg="--config=$path" ;;
    --workdir=*) arg="--workdir=$(absolute "${arg#--workdir=}")" ;;
    --config.data_dir=*) arg="--config.data_dir=$(absolute "${arg#--config.data_dir=}")" ;;
  esac
  args+=("$arg")
done
flags=$(printf '%q ' "${args[@]}")

case "$TASKS_PER_NODE" in
  gpu) layout="#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-task=1" ;;
  ''|*[!0-9]*) echo "error: TASKS_PER_NODE=$TASKS_PER_NODE: a number or 'gpu'" >&2; exit 2 ;;
  *) layout="#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
     [ "$GPUS_PER_NODE" = 0 ] || layout+="
#SBATCH --gpus-per-node=$GPUS_PER_NODE" ;;
esac

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
$layout
#SBATCH --cpus-per-task=${CPUS_PER_TASK:-16}
#SBATCH --time=$TIME
#SBATCH --signal=B:USR1@$SIGNAL_SECONDS
#SBATCH --requeue
#SBATCH --open-mode=append
${PARTITION:+#SBATCH --partition=$PARTITION}
#SBATCH --output=$LOG_DIR/%x-%j.out
set -uo pipefail
echo "job \$SLURM_JOB_ID start \${SLURM_RESTART_COUNT:-0} on \$SLURM_JOB_NODELIST at \$(date -u +%FT%TZ)"
near_limit=0
# Near the time limit: TERM to the training processes (not to this script), which save
# a checkpoint and exit 0; then requeue.
trap 'near_limit=1; echo "time limit near: saving"; scancel --signal=TERM "\$SLURM_JOB_ID"' USR1
srun --kill-on-bad-exit=1 "$VENV/bin/poster-cnn" --distributed=yes $flags &
pid=\$!
# wait returns early when a trap runs; wait again for srun's own exit status.
while wait "\$pid"; rc=\$?; kill -0 "\$pid" 2>/dev/null; do :; done
if [ "\$near_limit" = 1 ] && [ "\$rc" = 0 ]; then
  echo "requeueing job \$SLURM_JOB_ID"
  scontrol requeue "\$SLURM_JOB_ID"
fi
exit "\$rc"
SBATCH
)
if [ -n "${DRY_RUN:-}" ]; then echo "$script"; exit 0; fi
mkdir -p "$LOG_DIR"
echo "$script" | sbatch ${SBATCH_ARGS:-}
