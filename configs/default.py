"""Defaults for every field; variants import this and override.

    poster-cnn --config=configs/default.py --config.data_dir=DATA --workdir=RUN
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Data: a directory written by poster-cnn-convert.
  c.data_dir = ""
  c.train_split = "train"
  c.eval_split = "validation"  # model selection and threshold calibration
  c.test_split = "test"
  c.num_workers = 2  # grain worker processes decoding images; 0 = in-process
  c.image = ml_collections.ConfigDict(dict(
      height=224, width=224,
      resize="stretch",  # 'stretch' (the paper) or 'pad' (keep the poster's aspect)
      random_crop=False, crop_min_area=0.6, horizontal_flip=False, color_jitter=0.0,
  ))

  # A checkpoint to start from: poster-cnn-convert-weights' output (ImageNet weights) or a
  # training checkpoint (WORKDIR/checkpoints/STEP). Variables are matched by name and shape;
  # a classifier of another shape ('head') is re-initialised. '' = random init.
  c.init_from = ""

  c.model = ml_collections.ConfigDict(dict(
      # 'paper_cnn', 'resnet' or 'efficientnet_lite0'; each reads its own fields below
      name="paper_cnn",
      # paper_cnn:
      conv_features=(16, 32, 64, 128),
      conv_dropout=(0.1, 0.0, 0.2, 0.0),
      dense_features=(128, 128),
      dense_dropout=0.5,
      # resnet:
      stem_features=16,
      stage_features=(32, 64, 128, 256),
      blocks_per_stage=(1, 1, 1, 1),
      head_dropout=0.2,  # also efficientnet_lite0's, before its classifier
      # efficientnet_lite0 (ImageNet weights: poster-cnn-convert-weights, then init_from):
      drop_connect_rate=0.2,  # stochastic depth of the last block; 0 = off
      # Depthwise convolutions: 'auto' ('taps' on CPU, where XLA's are slow; else 'xla'),
      # 'taps' or 'xla'; same parameters, same results (poster_cnn/efficientnet.py).
      depthwise_impl="auto",
      # all:
      bn_momentum=0.99,
      bn_epsilon=1e-3,
      # How the 3x3 convolutions are computed (same parameters, same results):
      # 'auto' (onednn, else im2col, on CPU; nn.Conv elsewhere), 'xla' (nn.Conv), 'im2col',
      # 'xla_wgrad_im2col', 'xla_wgrad_taps', 'onednn'; see poster_cnn/model.py and
      # docs/BENCHMARKS.md.
      conv_impl="auto",
  ))
  # The paper's binary cross-entropy unless changed (poster_cnn/losses.py).
  c.loss = ml_collections.ConfigDict(dict(
      pos_weight_power=0.0,  # positives of genre k weigh ((N - P_k) / P_k) ** power
      max_pos_weight=50.0,
      gamma=0.0,  # focal loss exponent; 0 = plain cross-entropy
      label_smoothing=0.0,
  ))
  # > 0: blend each training example with another of its batch, lambda ~ Beta(a, a)
  # (poster_cnn/mixup.py); 0 = off.
  c.mixup_alpha = 0.0
  c.dtype = "float32"  # computation dtype: 'float32' or 'bfloat16'

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam",  # 'adam', 'adamw' or 'sgd'
      learning_rate=1e-3,
      b1=0.9, b2=0.999, eps=1e-7,  # Keras' Adam defaults
      momentum=0.9,  # sgd only
      weight_decay=0.0,  # adamw and sgd; never on biases or BatchNorm
      schedule="constant",  # 'constant' or 'cosine'
      warmup_steps=0,
      grad_clip_norm=0.0,  # 0 = off
      accumulate_steps=1,
      # Models with a classifier named 'head' (efficientnet_lite0), for fine-tuning: the
      # backbone's learning rate is this times the head's; freeze_backbone keeps it fixed.
      backbone_lr_multiplier=1.0,
      freeze_backbone=False,
  ))
  # > 0: keep an exponential moving average of the weights (and BatchNorm statistics)
  # and evaluate, select checkpoints and predict with it; 0 = off.
  c.ema_decay = 0.0

  c.batch_size = 32  # global, across all devices and hosts
  c.eval_batch_size = 64
  c.num_epochs = 20
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.seed = 0

  c.log_every_steps = 50
  c.eval_every_steps = -1  # -1 = once per epoch
  c.checkpoint_every_steps = -1  # -1 = at every evaluation
  c.keep_checkpoints = 3  # the latest N, plus the best by validation macro mAP

  c.top_k = 2  # the paper's prediction rule: the 2 most probable genres
  return c
