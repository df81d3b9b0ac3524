#!/usr/bin/env bash
# Multi-node GPU training on SLURM: one process per node drives all of its GPUs;
# jax.distributed.initialize() reads the SLURM environment (poster-cnn --distributed=auto).
#   NODES=2 GPUS_PER_NODE=8 PARTITION=gpu TIME=24:00:00 \
#     bash launch/slurm.sh --config=configs/paper.py --config.data_dir=DATA --workdir=RUN
# DATA and RUN must be on a file system every node sees. The virtual environment must
# already exist there (bash launch/tests.sh or launch/local.sh once creates it).
# DRY_RUN=1 prints the batch script instead of submitting it.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
NODES="${NODES:-1}"; GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
JOB_NAME="${JOB_NAME:-poster_cnn}"; TIME="${TIME:-24:00:00}"
[ $# -gt 0 ] || { echo "usage: slurm.sh [poster-cnn flags]" >&2; exit 2; }
flags=$(printf '%q ' "$@")
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=${CPUS_PER_TASK:-16}
#SBATCH --time=$TIME
${PARTITION:+#SBATCH --partition=$PARTITION}
#SBATCH --output=${LOG_DIR:-$REPO/runs/slurm}/%x-%j.out
set -euo pipefail
# A preempted job gets SIGTERM; poster-cnn saves a checkpoint and exits, and a
# resubmitted job resumes from it.
srun --kill-on-bad-exit=1 "$VENV/bin/poster-cnn" --distributed=yes $flags
SBATCH
)
if [ -n "${DRY_RUN:-}" ]; then echo "$script"; exit 0; fi
mkdir -p "${LOG_DIR:-$REPO/runs/slurm}"
echo "$script" | sbatch
