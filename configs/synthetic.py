"""The CPU demo: the paper's CNN on the built-in synthetic posters at 64x64.

    poster-cnn-synthesize --out_dir=runs/demo/posters_src --num_posters=3000
    poster-cnn-convert --csv=runs/demo/posters_src/MovieGenre.csv \
        --image_dir=runs/demo/posters_src/posters --output_dir=runs/demo/data
    poster-cnn --config=configs/synthetic.py --config.data_dir=runs/demo/data \
        --workdir=runs/demo/train

(`bash launch/quickstart.sh` runs all of it, then evaluation and prediction.)
"""

from poster_cnn.configs import default


def get_config():
  c = default.get_config()
  c.image.height = c.image.width = 64
  c.batch_size = 32
  c.num_epochs = 15
  c.log_every_steps = 25
  c.num_workers = 1
  return c
