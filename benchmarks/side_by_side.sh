#!/bin/bash
# The paper model's train and eval step against Keras and PyTorch, interleaved: ROUNDS
# rounds, each launching every setting once in the same order, so that the machine's load
# falls on all of them alike. Compare the ratios of one run (docs/BENCHMARKS.md).
#
#   TF_PYTHON=/tmp/tfvenv/bin/python TORCH_PYTHON=/tmp/torchvenv/bin/python \
#       bash benchmarks/side_by_side.sh [SETTING ...] > side_by_side.log
#
# SETTING (default: all) is one of ours ours_hp keras keras_hp torch torch_hp compile_hp;
# _hp runs with glibc's transparent huge pages, which `poster-cnn` sets for itself.
# ROUNDS (3) and ARGS ("--steps=5 --repeats=3") can be set too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ROUNDS=${ROUNDS:-3}
read -r -a A <<< "${ARGS:---steps=5 --repeats=3}"
HP="GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(ours ours_hp keras keras_hp torch torch_hp compile_hp)
for round in $(seq "$ROUNDS"); do
  for s in "${settings[@]}"; do
    echo "=== round $round $s $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    case $s in
      ours) "$PYTHON" benchmarks/train_throughput.py \
                --config=configs/paper.py "${A[@]}" --peak_gflops=100 ;;
      ours_hp) env "$HP" "$PYTHON" benchmarks/train_throughput.py \
                   --config=configs/paper.py "${A[@]}" --peak_gflops=100 ;;
      keras) "$TF_PYTHON" benchmarks/keras_reference.py "${A[@]}" ;;
      keras_hp) env "$HP" "$TF_PYTHON" benchmarks/keras_reference.py "${A[@]}" ;;
      torch) "$TORCH_PYTHON" benchmarks/pytorch_reference.py "${A[@]}" ;;
      torch_hp) env "$HP" "$TORCH_PYTHON" benchmarks/pytorch_reference.py "${A[@]}" ;;
      compile_hp) env "$HP" "$TORCH_PYTHON" benchmarks/pytorch_reference.py "${A[@]}" --compile=1 ;;
      *) echo "unknown setting: $s" >&2; exit 2 ;;
    esac 2>&1 | grep -E "^(train|eval) "
  done
done
