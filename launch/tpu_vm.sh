#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): the same command on every worker; JAX finds
# the other workers itself (poster-cnn --distributed=auto).
#   TPU_NAME=my-tpu ZONE=us-central2-b [PROJECT=...] [SETUP=1] \
#     bash launch/tpu_vm.sh --config=configs/paper.py --config.data_dir=DATA --workdir=RUN
# DATA is read with plain file I/O: a local copy on each worker or a gcsfuse mount. RUN must
# be shared by all workers (a gcsfuse mount, or a gs:// path: orbax writes those directly).
#
# SETUP=1 first ships this checkout's committed files plus uncommitted changes to tracked
# files (`git archive` of `git stash create`: no .venv, runs/ or other untracked files) to
# ~/poster_cnn on every worker, and installs it there into a fresh ~/poster_cnn/.venv with
# jax[tpu]. TPU VM images (tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, v2-alpha-tpuv6e:
# Ubuntu 22.04) carry Python 3.10, older than the package's requires-python (>= 3.11):
# the setup then uses the newest python3.1x on PATH that is new enough, and failing that
# installs uv from PyPI (pip install --user uv), which fetches a standalone Python 3.11.
#
# Training runs detached (setsid nohup): it survives the ssh session and prints the pid
# and log file of each worker, ~/poster_cnn/logs/<worker hostname>.log. STOP=1 sends the
# training processes SIGTERM instead: they save a checkpoint and exit (rerunning this
# script resumes from it). DRY_RUN=1 prints the commands instead of running them.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
: "${TPU_NAME:?set TPU_NAME}"; : "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-poster_cnn}"   # relative to the workers' home directories
if [ -z "${STOP:-}" ] && [ $# -eq 0 ]; then echo "usage: tpu_vm.sh [poster-cnn flags]" >&2; exit 2; fi
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all)
ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}")
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [ -n "${STOP:-}" ]; then
  run "${ssh[@]}" --command="cd ~/$REMOTE_DIR && kill -TERM \$(cat logs/\$(hostname).pid) \
&& echo \"\$(hostname): SIGTERM sent; the log says when the checkpoint is saved\""
  exit 0
fi

if [ -n "${SETUP:-}" ]; then
  archive="${TMPDIR:-/tmp}/poster_cnn-$$.tar.gz"
  git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 \
    || { echo "error: SETUP=1 ships a git checkout; $REPO is not one" >&2; exit 1; }
  # A commit of the working tree's tracked files, made without touching the tree or the
  # index; empty when nothing is modified, then HEAD.
  rev=$(git -C "$REPO" stash create 2>/dev/null || true)
  run git -C "$REPO" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" "${rev:-HEAD}"
  [ -n "${DRY_RUN:-}" ] || trap 'rm -f "$archive"' EXIT
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/$REMOTE_DIR.tar.gz" "${where[@]}"
  install=$(cat <<INSTALL
set -euo pipefail; cd ~
mkdir -p $REMOTE_DIR && find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
tar xzf $REMOTE_DIR.tar.gz && rm $REMOTE_DIR.tar.gz && cd $REMOTE_DIR
py=; for p in python3.13 python3.12 python3.11 python3; do
  if command -v \$p >/dev/null && \$p -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then py=\$p; break; fi
done
if [ -n "\$py" ]; then
  \$py -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e . 'jax[tpu]'
else
  echo "\$(hostname): python3 is \$(python3 -V 2>&1 | cut -d' ' -f2), older than 3.11: installing uv for a Python 3.11"
  python3 -m pip install -q --user uv && uv=~/.local/bin/uv
  \$uv venv -q --python 3.11 .venv && \$uv pip install -q --python .venv/bin/python -e . 'jax[tpu]'
fi
echo "\$(hostname): installed \$(.venv/bin/python -V) with poster_cnn and jax \$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
INSTALL
)
  run "${ssh[@]}" --command="$install"
fi

flags=$(printf '%q ' "$@")
train="cd ~/$REMOTE_DIR && mkdir -p logs || exit 1; log=logs/\$(hostname).log; \
setsid nohup .venv/bin/poster-cnn --distributed=auto $flags >>\"\$log\" 2>&1 </dev/null & \
pid=\$!; echo \$pid > logs/\$(hostname).pid; \
echo \"\$(hostname): training as pid \$pid, log ~/$REMOTE_DIR/\$log\""
run "${ssh[@]}" --command="$train"
