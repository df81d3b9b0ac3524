import collections

import numpy as np
import pytest

from poster_cnn.data import pipeline, records, tfrecord

OPTS = pipeline.ImageOptions(height=16, width=16)


def _train_order(data_dir, process_index, process_count, n_batches, batch=4, seed=0):
  ds = pipeline.train_dataset(data_dir, "train", global_batch_size=batch * process_count,
                              image=OPTS, seed=seed, process_index=process_index,
                              process_count=process_count)
  it = iter(ds)
  return [next(it) for _ in range(n_batches)]


def _fingerprints(batches):
  return [b["image"][i].tobytes() for b in batches for i in range(len(b["image"]))]


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_train_processes_cover_each_epoch_disjointly(tiny_dataset, process_count):
  # 96 train examples; per-process batch 4 -> 96 / process_count / 4 batches per epoch.
  per_process_batches = 96 // process_count // 4
  seen = []
  for p in range(process_count):
    seen += _fingerprints(_train_order(tiny_dataset, p, process_count, per_process_batches))
  everything = _fingerprints(list(pipeline.eval_dataset(
      tiny_dataset, "train", global_batch_size=96, image=OPTS)))
  assert len(seen) == 96
  assert collections.Counter(seen) == collections.Counter(everything)


def test_each_epoch_has_a_new_order_reproducible_under_the_seed(tiny_dataset):
  two_epochs = _fingerprints(_train_order(tiny_dataset, 0, 1, 48))
  first, second = two_epochs[:96], two_epochs[96:]
  assert sorted(first) == sorted(second) and first != second
  assert two_epochs == _fingerprints(_train_order(tiny_dataset, 0, 1, 48))
  assert first != _fingerprints(_train_order(tiny_dataset, 0, 1, 24, seed=1))


def test_order_mixes_shards(tiny_dataset):
  # Shard 0 holds records 0..47, shard 1 records 48..95: the eval order tells which.
  order_by_image = {img: i for i, img in enumerate(_fingerprints(list(
      pipeline.eval_dataset(tiny_dataset, "train", global_batch_size=96, image=OPTS))))}
  shards = [order_by_image[f] >= 48 for f in _fingerprints(_train_order(tiny_dataset, 0, 1, 24))]
  longest, run = 1, 1
  for a, b in zip(shards, shards[1:]):
    run = run + 1 if a == b else 1
    longest = max(longest, run)
  assert longest < 12  # a run of 12 from one of two shards has probability ~1e-3


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_visits_every_example_once_with_equal_batch_counts(tiny_dataset, process_count):
  indices, batch_counts = [], []
  for p in range(process_count):
    batches = list(pipeline.eval_dataset(tiny_dataset, "validation", global_batch_size=5 * process_count,
                                         image=OPTS, process_index=p,
                                         process_count=process_count))
    batch_counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (5, 16, 16, 3)
      assert (b["index"][b["mask"]] >= 0).all() and (b["index"][~b["mask"]] == -1).all()
      indices += b["index"][b["mask"]].tolist()
  assert len(set(batch_counts)) == 1
  assert sorted(indices) == list(range(24))
  assert batch_counts[0] == pipeline.eval_num_batches(
      tiny_dataset, "validation", global_batch_size=5 * process_count, process_count=process_count)


def test_batches_are_uint8_images_and_multi_hot_labels(tiny_dataset):
  b = _train_order(tiny_dataset, 0, 1, 1)[0]
  assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 16, 16, 3)
  assert b["labels"].dtype == np.uint8 and b["labels"].shape == (4, 4)
  assert b["mask"].all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restores_exactly_in_a_fresh_iterator(tiny_dataset, num_workers):
  opts = pipeline.ImageOptions(height=16, width=16, random_crop=True, horizontal_flip=True,
                               color_jitter=0.2)
  make = lambda: iter(pipeline.train_dataset(tiny_dataset, "train", global_batch_size=4,
                                             image=opts, seed=3, num_workers=num_workers))
  it = make()
  for _ in range(30):  # past the first epoch boundary (24 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(5)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  for i in (it, resumed):
    if hasattr(i, "close"):
      i.close()


def test_host_batches_do_not_depend_on_augmentation_options(tiny_dataset):
  # Augmentation runs on the device (tests/test_preprocess.py): the host ships the same
  # deterministic uint8 batches whatever it asks for.
  plain = _train_order(tiny_dataset, 0, 1, 2)
  opts = pipeline.ImageOptions(height=16, width=16, random_crop=True, horizontal_flip=True,
                               color_jitter=0.3)
  it = iter(pipeline.train_dataset(tiny_dataset, "train", global_batch_size=4, image=opts, seed=0))
  for p in plain:
    a = next(it)
    np.testing.assert_array_equal(a["image"], p["image"])
    np.testing.assert_array_equal(a["labels"], p["labels"])


def test_pad_resize_keeps_aspect(tmp_path):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", (20, 40), (255, 255, 255)).save(buf, "PNG")
  out = pipeline.decode_image(buf.getvalue(), 32, 32, "pad")
  assert out.shape == (32, 32, 3)
  assert out[:, :4].max() == 0 and out[:, -4:].max() == 0  # black side bars
  assert out[:, 12:20].min() == 255


def test_stored_jpegs_are_decoded_at_the_smallest_dct_scale_above_the_training_size(
    monkeypatch):
  # 268x182 posters for 96x96 training: libjpeg-turbo's 5/8 scale, no PIL resize.
  import simplejpeg
  opts = pipeline.ImageOptions(height=96, width=96)
  assert pipeline.carrier_size((268, 182), opts) == (168, 114)
  assert pipeline.carrier_size((268, 182), opts, "raw") == (268, 182)
  assert pipeline.carrier_size((80, 80), opts) == (80, 80)  # never upscaled
  assert pipeline.carrier_size(None, opts) == (96, 96)
  poster = np.random.default_rng(0).integers(0, 256, (268, 182, 3), np.uint8)
  data = simplejpeg.encode_jpeg(poster, quality=90)
  monkeypatch.setattr(pipeline, "decode_image", None)  # the fast path only
  got = pipeline.decode_stored(data, (168, 114))
  np.testing.assert_array_equal(got, simplejpeg.decode_jpeg(data, "RGB", min_height=96,
                                                             min_width=96))


def test_too_small_split_is_a_clear_error(tiny_dataset):
  with pytest.raises(ValueError, match="too few"):
    pipeline.train_dataset(tiny_dataset, "validation", global_batch_size=64, image=OPTS, seed=0)


def test_corrupt_shard_is_named(tmp_path, tiny_dataset):
  import shutil
  d = tmp_path / "ds"
  shutil.copytree(tiny_dataset, d)
  shard = d / records.shard_filename("train", 1, 2)
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(tfrecord.CorruptRecordError, match=shard.name):
    pipeline.train_dataset(str(d), "train", global_batch_size=4, image=OPTS, seed=0)


def test_a_dead_worker_is_a_prompt_clear_error(tiny_dataset):
  import signal
  import psutil
  it = iter(pipeline.train_dataset(tiny_dataset, "train", global_batch_size=4, image=OPTS,
                                   seed=0, num_workers=2))
  next(it)
  for child in psutil.Process().children(recursive=True):
    if "resource_tracker" not in " ".join(child.cmdline()):  # grain's workers only
      child.send_signal(signal.SIGKILL)
  with pytest.raises(RuntimeError, match="terminated unexpectedly"):
    for _ in range(100):
      next(it)


def test_worker_batches_leave_no_shared_memory_behind_at_exit(tiny_dataset):
  # Batches still referenced at exit are unlinked by us, not by multiprocessing's
  # resource tracker with a "leaked shared_memory objects" warning.
  import subprocess
  import sys
  code = ("import sys\n"
          "from poster_cnn.data import pipeline\n"
          "def read(data_dir):\n"
          "  opts = pipeline.ImageOptions(height=32, width=32)\n"
          "  it = iter(pipeline.train_dataset(data_dir, 'train', global_batch_size=4, "
          "image=opts, seed=0, num_workers=1))\n"
          "  batches = [next(it) for _ in range(20)]\n"
          "  it.close()\n"  # as training and evaluation do
          "  return batches[-1]\n"
          "read(sys.argv[1])\n")
  result = subprocess.run([sys.executable, "-c", code, str(tiny_dataset)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "leaked shared_memory" not in result.stderr
  assert "Exception ignored" not in result.stderr


def test_read_ahead_is_a_few_batches_not_the_dataset(tiny_dataset, monkeypatch):
  # A slow consumer (the train step) must not let decoded images pile up.
  import threading
  import time
  decoded = 0
  lock = threading.Lock()
  real = pipeline.decode_stored

  def counting(*args, **kwargs):
    nonlocal decoded
    with lock:
      decoded += 1
    return real(*args, **kwargs)

  monkeypatch.setattr(pipeline, "decode_stored", counting)
  it = iter(pipeline.train_dataset(tiny_dataset, "train", global_batch_size=4, image=OPTS,
                                   seed=0, num_workers=0))
  next(it)
  time.sleep(1.0)
  # One batch taken, two batches read ahead, plus what the 16 threads hold.
  assert decoded <= 4 + 2 * 4 + 16, decoded
  it.close()
