#!/usr/bin/env bash
# Train (or evaluate/predict) on this machine's devices: CPU, or all local GPUs/TPUs.
#   bash launch/local.sh --config=configs/paper.py --config.data_dir=DATA --workdir=RUN
# DRY_RUN=1 prints the command instead of running it.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cmd=("$VENV/bin/poster-cnn" "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
setup_venv
exec "${cmd[@]}"
