"""Fine-tuning ImageNet EfficientNet-Lite0 on the real posters (the paper's 13 genres).

Posters are 182x268 (width x height); they are resized to 192x128 (height x width),
keeping their aspect, with horizontal flips and random crops. The ImageNet weights
start the backbone, a new 13-genre classifier is initialised; AdamW with one warmup
epoch then cosine decay, the backbone at a tenth of the head's learning rate, 8
epochs, validation-selected checkpoint. docs/RESULTS.md says what a run costs on a
2-core CPU.

Once: the weights and the fixed split of the real posters (configs/splits/movie_posters.csv,
stratified on the 13 genres; posters with none of them are dropped by --vocabulary=paper):

    poster-cnn-convert-weights --output_dir=$HOME/weights/efficientnet_lite0
    poster-cnn-convert --csv=../shared/data/movie-posters/MovieGenre.csv \
        --image_dir=../shared/data/movie-posters/posters --output_dir=/tmp/movie_posters \
        --split_file=configs/splits/movie_posters.csv --image_size=none

Then

    poster-cnn --config=configs/posters_efficientnet.py --config.data_dir=/tmp/movie_posters \
        --config.init_from=$HOME/weights/efficientnet_lite0 --workdir=RUN --config.seed=0
    poster-cnn --mode=evaluate --workdir=RUN      # best (validation) checkpoint, test split
"""

from poster_cnn.configs import default

TRAIN_POSTERS = 8_719  # the train split of /tmp/movie_posters (13 genres)


def get_config():
  c = default.get_config()
  c.eval_split = "validation"  # model selection and threshold calibration
  c.test_split = "test"
  c.image.height, c.image.width = 192, 128
  c.image.horizontal_flip = True
  c.image.random_crop = True
  c.model.name = "efficientnet_lite0"
  c.model.head_dropout = 0.2
  c.model.drop_connect_rate = 0.2
  c.model.bn_momentum = 0.99  # the ImageNet weights' (TensorFlow's) BatchNorm settings
  c.model.bn_epsilon = 1e-3
  c.init_from = ""  # --config.init_from=the directory poster-cnn-convert-weights wrote
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.backbone_lr_multiplier = 0.1
  c.optimizer.schedule = "cosine"
  c.batch_size = 32
  c.optimizer.warmup_steps = TRAIN_POSTERS // c.batch_size  # one epoch
  c.num_epochs = 8
  c.log_every_steps = 25
  c.num_workers = 1  # 2 cores: one decodes, the main process trains
  c.keep_checkpoints = 1  # plus the best by validation macro mAP
  return c
