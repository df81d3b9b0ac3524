"""A seconds-long config for tests: 32x32 images, a narrow paper-shaped CNN.

    poster-cnn --config=configs/tiny.py --config.data_dir=DATA --workdir=RUN
"""

from poster_cnn.configs import default


def get_config():
  c = default.get_config()
  c.image.height = c.image.width = 32
  c.model.conv_features = (8, 8, 16, 16)
  c.model.dense_features = (32, 32)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_epochs = 1
  c.num_train_steps = 6
  c.eval_every_steps = 3
  c.log_every_steps = 2
  c.num_workers = 0
  return c
