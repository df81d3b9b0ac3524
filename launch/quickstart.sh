#!/usr/bin/env bash
# The whole path on the built-in synthetic posters, on one CPU, in a few minutes:
# synthesize posters -> convert to TFRecord -> train the paper's CNN -> evaluate the
# best checkpoint on the test split -> write a report with plots -> print genres for a few posters.
#   bash launch/quickstart.sh [RUN_DIR]        (default: runs/quickstart)
# Extra training flags go through TRAIN_FLAGS, e.g. TRAIN_FLAGS=--config.num_epochs=2.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
RUN="${1:-$REPO/runs/quickstart}"
NUM_POSTERS="${NUM_POSTERS:-3000}"

echo "== setting up $VENV"
setup_venv plots
export PATH="$VENV/bin:$PATH"
cd "$REPO"

if [ ! -f "$RUN/posters/MovieGenre.csv" ]; then
  echo "== synthesizing $NUM_POSTERS posters into $RUN/posters"
  poster-cnn-synthesize --out_dir="$RUN/posters" --num_posters="$NUM_POSTERS" --seed=0
fi
if [ ! -f "$RUN/data/dataset_info.json" ]; then
  echo "== converting to TFRecord in $RUN/data"
  poster-cnn-convert --csv="$RUN/posters/MovieGenre.csv" --image_dir="$RUN/posters/posters" \
    --output_dir="$RUN/data" --vocabulary=paper --seed=0
fi
echo "== training (configs/synthetic.py) in $RUN/train"
poster-cnn --config=configs/synthetic.py --config.data_dir="$RUN/data" \
  --workdir="$RUN/train" ${TRAIN_FLAGS:-}
echo "== evaluating the best checkpoint on the test split"
poster-cnn --mode=evaluate --workdir="$RUN/train" --split=test
echo "== writing the report (plots + metrics) of that evaluation"
REPORT="$(poster-cnn --mode=report --workdir="$RUN/train" --split=test)"
echo "$REPORT"
echo "== predicting genres for a few posters"
poster-cnn --mode=predict --workdir="$RUN/train" \
  --images="$(ls "$RUN"/posters/posters/*.jpg | head -5 | paste -sd, -)"
echo
echo "== done"
echo "$REPORT"
