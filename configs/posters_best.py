"""The best configuration measured on the real posters (docs/RESULTS.md): ImageNet
EfficientNet-Lite0 with its backbone frozen, at 224x224. The backbone runs as at
inference (its ImageNet BatchNorm statistics, no stochastic depth) and only the 13-genre
classifier is trained, on horizontally flipped and unflipped posters, 3 epochs of AdamW at
3e-3 (one warmup epoch, then cosine), validation-selected checkpoint. A step costs a
forward pass of the backbone: 25-30 images/s on 2 CPU cores, about 20 minutes a run
with its validation passes.

Convert the weights and the real posters once, as configs/posters_efficientnet.py says. Then

    poster-cnn --config=configs/posters_best.py --config.data_dir=/tmp/movie_posters \
        --config.init_from=$HOME/weights/efficientnet_lite0 --workdir=RUN --config.seed=0
    poster-cnn --mode=evaluate --workdir=RUN      # best (validation) checkpoint, test split
"""

from poster_cnn.configs import posters_efficientnet


def get_config():
  c = posters_efficientnet.get_config()
  c.image.height, c.image.width = 224, 224  # the weights' ImageNet resolution
  c.image.random_crop = False
  c.optimizer.freeze_backbone = True
  c.optimizer.learning_rate = 3e-3
  c.num_epochs = 3
  return c
