"""What a training run leaves in TensorBoard: losses side by side, hyperparameters, posters."""

import io
import os

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from configs import tiny
from poster_cnn import logs, train
from poster_cnn.data import tfrecord


def _events(logdir) -> list:
  events = []
  for root, _, files in os.walk(logdir):
    for f in files:
      if "tfevents" in f:
        for record in tfrecord.iter_records(os.path.join(root, f)):
          events.append(event_pb2.Event.FromString(record))
  return events


def test_tensorboard_gets_validation_loss_hyperparameters_and_captioned_posters(tiny_dataset,
                                                                               tmp_path):
  c = tiny.get_config()
  c.data_dir = tiny_dataset
  train.train_and_evaluate(c, str(tmp_path))
  values = [(e.step, v) for e in _events(tmp_path / "tensorboard") for v in e.summary.value]
  tags = {v.tag for _, v in values}
  assert {"loss/train", "loss/validation", "validation/macro_map"} <= tags
  assert {s for s, v in values if v.tag == "loss/validation"} == {3, 6}
  assert any(v.metadata.plugin_data.plugin_name == "hparams" for _, v in values)
  [image] = [v.image for s, v in values if v.tag == "validation/posters" and s == 6]
  with Image.open(io.BytesIO(image.encoded_image_string)) as grid:
    assert grid.width == 4 * 160 and np.asarray(grid).std() > 0
  [text] = [v.tensor for s, v in values if v.tag == "validation/posters/text_summary" and s == 6]
  assert "true:" in text.string_val[0].decode() and "pred:" in text.string_val[0].decode()


def test_captions_name_true_genres_and_top_predictions():
  labels = np.array([[1, 0, 1], [0, 0, 0]], np.uint8)
  scores = np.array([[0.1, 0.7, 0.9], [0.3, 0.2, 0.1]], np.float32)
  assert logs.captions(labels, scores, ["a", "b", "c"], k=2) == [
      "true: a, c\npred: c 0.90, b 0.70", "true: -\npred: a 0.30, b 0.20"]
