"""One decoding path: the images --mode=predict feeds the model are exactly those the
converter + training pipeline make of the same files (16-bit, palette with
transparency, RGBA, CMYK, greyscale), at the dataset's carrier size, in either stored
layout, and the converter's options are the dataset's. (The eval step resizes both alike
on the device: tests/test_preprocess.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from poster_cnn import predict
from poster_cnn.data import convert as conv
from poster_cnn.data import images, pipeline

from test_convert import KAGGLE_HEADER, kaggle_row, read_split, write_csv

OPTS = pipeline.ImageOptions(height=32, width=24)


def _png(img: Image.Image, **save) -> bytes:
  out = io.BytesIO()
  img.save(out, "PNG", **save)
  return out.getvalue()


def _sixteen_bit() -> bytes:
  ramp = np.linspace(0, 65535, 40 * 30).reshape(40, 30).astype(np.uint16)
  return _png(Image.fromarray(ramp))


def _palette_with_transparency() -> bytes:
  img = Image.new("P", (30, 40), 0)
  img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
  img.paste(1, (15, 0, 30, 40))
  return _png(img, transparency=0)  # the red half is transparent


def _rgba() -> bytes:
  img = Image.new("RGBA", (30, 40), (0, 200, 0, 255))
  img.paste((255, 0, 0, 0), (0, 0, 15, 40))
  return _png(img)


def _encoded(mode: str, fmt: str) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (30, 40), (200, 40, 40)).convert(mode).save(out, fmt)
  return out.getvalue()


FILES = {"100001": ("png", _sixteen_bit()), "100002": ("png", _palette_with_transparency()),
         "100003": ("png", _rgba()), "100004": ("jpg", _encoded("CMYK", "JPEG")),
         "100005": ("jpg", _encoded("L", "JPEG")), "100006": ("jpg", _encoded("RGB", "JPEG"))}


@pytest.fixture(scope="module", params=["none", "48x36", "48x36 raw"])
def converted(tmp_path_factory, request):
  d = tmp_path_factory.mktemp("decoding")
  (d / "posters").mkdir()
  for imdb_id, (ext, data) in FILES.items():
    (d / "posters" / f"{imdb_id}.{ext}").write_bytes(data)
  csv_path = write_csv(d / "MovieGenre.csv", KAGGLE_HEADER,
                       [kaggle_row(i, "Drama") for i in FILES])
  out = d / "out"
  size, *raw = request.param.split()
  conv.convert(csv_path, out, vocabulary="drama", splits="train:1", num_workers=0,
               image_size=size, jpeg_quality=90, image_format="raw" if raw else "jpeg")
  return d, out


def _predict_inputs(paths, stored) -> np.ndarray:
  errors = []
  batches = list(predict._batches(paths, len(paths), OPTS, stored, errors))
  assert not errors
  (_, inputs), = batches
  return inputs


def test_predict_sees_exactly_what_training_sees(converted):
  d, out = converted
  stored = images.dataset_options(out)
  assert stored.quality == 90
  # What evaluation feeds the eval step: the pipeline's batches, in record order.
  batch, = pipeline.eval_dataset(out, "train", global_batch_size=len(FILES), image=OPTS)
  trained = {e["id"]: x for e, x in zip(read_split(out, "train"), batch["image"])}
  ids = sorted(FILES)
  inputs = _predict_inputs([str(d / "posters" / f"{i}.{FILES[i][0]}") for i in ids], stored)
  # The carrier: the training size (mixed sizes, resized on the host), the smallest DCT
  # scale of the stored JPEGs still >= 32x24 (6/8: decoded smaller, resized on the
  # device), or the raw pixels' own size.
  assert inputs.shape[1:3] == {None: (32, 24), False: (36, 27), True: (48, 36)}[
      stored.size and stored.raw]
  for imdb_id, x in zip(ids, inputs):
    np.testing.assert_array_equal(x, trained[imdb_id], err_msg=imdb_id)
  sixteen, palette = inputs[ids.index("100001")], inputs[ids.index("100002")]
  assert 100 < sixteen.mean() < 160  # the ramp scaled to 8 bits, not clipped to white
  assert (palette[:, :8].astype(int) > 230).all()  # transparent half on white, not red
  assert (palette[:, -8:, 2] > 200).all()


def test_options_default_to_the_converter_defaults_without_a_dataset(tmp_path):
  stored = images.dataset_options(tmp_path / "nothing")
  assert (stored.size, stored.quality) == (None, images.DEFAULT_JPEG_QUALITY)
