#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): the same command on every worker; JAX finds
# the other workers itself (poster-cnn --distributed=auto).
#   TPU_NAME=my-tpu ZONE=us-central2-b [PROJECT=...] \
#     bash launch/tpu_vm.sh --config=configs/paper.py --config.data_dir=DATA --workdir=RUN
# DATA is read with plain file I/O: a local copy on each worker or a gcsfuse mount. RUN must
# be shared by all workers (a gcsfuse mount, or a gs:// path: orbax writes those directly).
# SETUP=1 first copies this checkout to every worker and installs it there.
# DRY_RUN=1 prints the gcloud commands instead of running them.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
: "${TPU_NAME:?set TPU_NAME}"; : "${ZONE:?set ZONE}"
[ $# -gt 0 ] || { echo "usage: tpu_vm.sh [poster-cnn flags]" >&2; exit 2; }
REMOTE_DIR="${REMOTE_DIR:-poster_cnn}"
gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all)
setup=(gcloud compute tpus tpu-vm scp --recurse "$REPO" "$TPU_NAME:~/$REMOTE_DIR" --zone="$ZONE"
       ${PROJECT:+--project="$PROJECT"} --worker=all)
install="cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
train="cd ~/$REMOTE_DIR && .venv/bin/poster-cnn --distributed=auto $(printf '%q ' "$@")"
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
if [ -n "${SETUP:-}" ]; then
  run "${setup[@]}"
  run "${gcloud_ssh[@]}" --command="$install"
fi
run "${gcloud_ssh[@]}" --command="$train"
