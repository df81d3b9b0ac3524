import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from poster_cnn import preprocess
from poster_cnn.data import convert, pipeline

AUG = pipeline.ImageOptions(height=16, width=16, random_crop=True, horizontal_flip=True,
                            color_jitter=0.3)


def _images(n=4, h=24, w=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw,out", [((24, 16), (16, 16)), ((12, 20), (16, 32)),
                                    ((40, 40), (16, 16))])
def test_stretch_is_jax_image_bilinear_resize(hw, out):
  x = _images(h=hw[0], w=hw[1])
  got = preprocess.prepare(jnp.asarray(x), pipeline.ImageOptions(height=out[0], width=out[1]))
  want = jax.image.resize(x.astype(np.float32), (4, *out, 3), "linear")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3)


def test_crops_sample_as_scale_and_translate():
  x = jnp.asarray(_images(1, 24, 16)[0])
  for scale, translation in [((1.4, 1.1), (-6.0, -2.5)), ((0.6, 0.8), (1.0, 0.0))]:
    s, t = jnp.asarray(scale), jnp.asarray(translation)
    want = jax.image.scale_and_translate(x.astype(jnp.float32), (16, 16, 3), (0, 1), s, t,
                                         "linear")
    taps = (preprocess._num_taps(24, 16, 1 / 0.6), preprocess._num_taps(16, 16, 1 / 0.6))
    got = preprocess._resample(x, (16, 16), s, t, jnp.asarray(False), taps)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3)
    flipped = preprocess._resample(x, (16, 16), s, t, jnp.asarray(True), taps)
    np.testing.assert_allclose(np.asarray(flipped), np.asarray(want)[:, ::-1], atol=1e-3)


def test_pad_keeps_aspect_with_black_bars():
  x = np.full((1, 32, 16, 3), 200, np.uint8)
  got = np.asarray(preprocess.prepare(jnp.asarray(x), pipeline.ImageOptions(
      height=16, width=16, resize="pad")))
  assert got.shape == (1, 16, 16, 3)
  assert got[0, :, :3].max() == 0 and got[0, :, -3:].max() == 0
  np.testing.assert_allclose(got[0, :, 5:11], 200, atol=1e-3)


def test_model_sized_batches_without_augmentation_pass_through_untouched():
  x = jnp.asarray(_images(h=16, w=16))
  assert preprocess.prepare(x, pipeline.ImageOptions(height=16, width=16)) is x
  assert preprocess.prepare(x, AUG) is x  # no key: evaluation never augments


def test_augmentation_is_a_function_of_the_key_alone():
  x = jnp.asarray(_images())
  f = jax.jit(lambda images, step: preprocess.prepare(
      images, AUG, jax.random.fold_in(jax.random.key(7), step)))
  a, again, other = f(x, 3), f(x, 3), f(x, 4)
  assert a.shape == (4, 16, 16, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
  assert not np.array_equal(np.asarray(a), np.asarray(other))
  assert float(a.min()) >= 0 and float(a.max()) <= 255
  plain = preprocess.prepare(x, pipeline.ImageOptions(height=16, width=16))
  assert not np.allclose(np.asarray(a), np.asarray(plain), atol=1)


def test_flip_alone_mirrors_some_examples_and_leaves_the_others():
  x = jnp.asarray(_images(n=16))
  opts = pipeline.ImageOptions(height=16, width=16, horizontal_flip=True)
  got = np.asarray(preprocess.prepare(x, opts, jax.random.key(0)))
  plain = np.asarray(preprocess.prepare(x, pipeline.ImageOptions(height=16, width=16)))
  flipped = [np.allclose(g, p[:, ::-1], atol=1e-3) for g, p in zip(got, plain)]
  kept = [np.allclose(g, p, atol=1e-3) for g, p in zip(got, plain)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_the_eval_step_resizes_as_prepare_does():
  # Evaluation and prediction (inference.jit_eval_step) take the pipeline's carrier-size
  # batches and resize them on the device, exactly as prepare does without a key.
  from poster_cnn import inference
  mesh = inference.create_mesh()
  x = _images(h=24, w=16)
  opts = pipeline.ImageOptions(height=16, width=12)

  def apply_fn(variables, images, train):
    return images.reshape(len(images), -1)[:, :7] * variables["scale"]

  variables = {"scale": jnp.float32(0.01)}
  got = inference.jit_eval_step(apply_fn, mesh, opts)(
      variables, inference.global_batch({"image": x}, mesh))
  want = jax.nn.sigmoid(apply_fn(variables, preprocess.prepare(jnp.asarray(x), opts), False))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


# ------------------------------------------------------------------ stored layouts


def _kaggle(directory, n=24, size=(16, 24)):
  """A Kaggle-layout CSV of noisy posters (width, height = size)."""
  rng = np.random.default_rng(0)
  posters = directory / "posters"
  posters.mkdir(parents=True)
  lines = ["imdbId,Imdb Link,Title,IMDB Score,Genre,Poster"]
  for i in range(n):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    (posters / f"{1000 + i}.jpg").write_bytes(buf.getvalue())
    lines.append(f"{1000 + i},http://www.imdb.com/title/tt{1000 + i},Movie {i},7.0,"
                 f"{['Drama', 'Comedy', 'Drama|Comedy'][i % 3]},")
  (directory / "MovieGenre.csv").write_text("\n".join(lines) + "\n")
  return directory / "MovieGenre.csv"


def _batches(data_dir, opts, n):
  it = iter(pipeline.train_dataset(data_dir, "train", global_batch_size=4, image=opts, seed=1))
  out = [next(it) for _ in range(n)]
  out += list(pipeline.eval_dataset(data_dir, "validation", global_batch_size=4, image=opts))
  return out


def test_raw_layout_ships_the_pixels_the_jpeg_layout_decodes(tmp_path):
  # Posters already at the stored size pass through as JPEG byte for byte; stored raw,
  # the pipeline must ship exactly what decoding them gives.
  csv = _kaggle(tmp_path)
  common = dict(vocabulary="min_count:1", splits="train:0.5,validation:0.5", num_workers=0,
                image_size="24x16")
  convert.convert(csv, tmp_path / "jpeg", **common)
  convert.convert(csv, tmp_path / "raw", image_format="raw", **common)
  assert json.loads((tmp_path / "raw" / "metadata.json").read_text())["image_format"] == "raw"
  opts = pipeline.ImageOptions(height=32, width=32)
  jpeg, raw = _batches(tmp_path / "jpeg", opts, 5), _batches(tmp_path / "raw", opts, 5)
  for a, b in zip(jpeg, raw):
    assert a["image"].shape[1:] == (24, 16, 3)  # the carrier: the stored size
    for k in ("image", "labels", "mask", "index"):
      np.testing.assert_array_equal(a[k], b[k])


def test_raw_needs_an_image_size(tmp_path):
  with pytest.raises(convert.ConversionError, match="image_format=raw"):
    convert.convert(_kaggle(tmp_path), tmp_path / "raw", image_format="raw", num_workers=0)
