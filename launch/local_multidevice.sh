#!/usr/bin/env bash
# Simulate N devices on the CPU (XLA host-platform devices) to exercise the sharded step.
#   bash launch/local_multidevice.sh 4 --config=configs/synthetic.py --config.data_dir=DATA --workdir=RUN
# DRY_RUN=1 prints the command instead of running it.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
n="${1:?usage: local_multidevice.sh NUM_DEVICES [poster-cnn flags]}"; shift
env_vars=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$n ${XLA_FLAGS:-}")
cmd=(env "${env_vars[@]}" "$VENV/bin/poster-cnn" "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
setup_venv
exec "${cmd[@]}"
