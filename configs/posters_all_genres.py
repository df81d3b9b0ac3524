"""configs/posters_efficientnet.py on the second vocabulary of the real posters: every genre
with >= 100 posters (22 genres: the paper's 13 plus documentary, family, biography,
history, music, war, musical, sport, western), the same fixed split
(configs/splits/movie_posters.csv; one poster has none of the 22 and is dropped).

    poster-cnn-convert-weights --output_dir=$HOME/weights/efficientnet_lite0   # once
    poster-cnn-convert --csv=../shared/data/movie-posters/MovieGenre.csv \
        --image_dir=../shared/data/movie-posters/posters --output_dir=/tmp/movie_posters_all \
        --split_file=configs/splits/movie_posters.csv --vocabulary=min_count:100 \
        --image_size=none
    poster-cnn --config=configs/posters_all_genres.py \
        --config.data_dir=/tmp/movie_posters_all \
        --config.init_from=$HOME/weights/efficientnet_lite0 --workdir=RUN --config.seed=0
    poster-cnn --mode=evaluate --workdir=RUN      # best (validation) checkpoint, test split
"""

from poster_cnn.configs import posters_efficientnet

TRAIN_POSTERS = 9_392  # the train split of /tmp/movie_posters_all


def get_config():
  c = posters_efficientnet.get_config()
  c.optimizer.warmup_steps = TRAIN_POSTERS // c.batch_size  # one epoch
  return c
