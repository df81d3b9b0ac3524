"""The best configuration measured on real posters without pretrained weights
(docs/RESULTS.md; configs/posters_best.py is the best with them): a small ResNet with global average pooling instead of the paper's CNN,
horizontal flips and random crops, one warmup epoch then cosine decay, 20 epochs; at
96x96 like configs/posters_sample.py.

Convert ../shared/data/movie-posters as in configs/posters_sample.py, then

    poster-cnn --config=configs/posters_resnet.py --config.data_dir=/tmp/movie_posters \
        --workdir=RUN --config.seed=0
    poster-cnn --mode=evaluate --workdir=RUN      # best (validation) checkpoint, test split
"""

from poster_cnn.configs import posters_sample


def get_config():
  c = posters_sample.get_config()
  c.model.name = "resnet"
  c.model.stem_features = 16
  c.model.stage_features = (16, 32, 64, 128)
  c.model.blocks_per_stage = (1, 1, 1, 1)
  c.image.horizontal_flip = True
  c.image.random_crop = True
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 272  # one epoch of the 8,719 training posters (13 genres)
  c.num_epochs = 20
  return c
