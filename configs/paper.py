"""The seed paper exactly: 224x224 stretched posters in [0, 1], the 4-conv CNN,
Adam (Keras defaults), binary cross-entropy, batch 32, 20 epochs, top-2 rule.

The paper split 80/20 and watched the 20% during training, so convert with

    poster-cnn-convert --csv=MovieGenre.csv --image_dir=posters --output_dir=data/paper \
        --vocabulary=paper --splits=train:0.8,test:0.2
    poster-cnn --config=configs/paper.py --config.data_dir=data/paper --workdir=runs/paper
"""

from poster_cnn.configs import default


def get_config():
  c = default.get_config()
  c.eval_split = "test"
  c.test_split = "test"
  return c
