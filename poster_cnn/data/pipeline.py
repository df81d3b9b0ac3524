"""grain input pipelines over a converted poster dataset.

Shuffle design: random access over an index of record offsets
(`tfrecord.TFRecordSource`), not interleave + window shuffle. Each epoch is a
global permutation of the whole split (grain's `MapDataset.shuffle`, reseeded
per epoch by `repeat`), so consecutive examples never come in runs from one
shard and no shuffle buffer of decoded images is held in memory. The iterator
state is a position in that deterministic sequence, which makes it cheap to
checkpoint and exact to restore. The price is one seek per record, which on
local or network file systems is negligible next to JPEG decoding.

Host sharding: every process sees the same permutation of each epoch and
takes every `process_count`-th element starting at its `process_index`, so
over one epoch the processes' examples are disjoint and their union is the
split (less `len % process_count` examples dropped per epoch in training, a
different few each epoch, so that every process runs the same number of
steps).

Batches are dicts of host-local numpy arrays:
  image   uint8  (local_batch, height, width, 3)   normalised on device
  labels  uint8  (local_batch, num_classes)        multi-hot
  mask    bool   (local_batch,)                    False on eval padding
  index   int64  (local_batch,)                    record index, -1 on padding
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import io
import os

import grain
import numpy as np
from absl import flags
from PIL import Image

from poster_cnn.data import records, tfrecord, workers


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How a stored poster becomes a model input."""

  height: int = 224
  width: int = 224
  # 'stretch' resizes to height x width ignoring aspect (the paper);
  # 'pad' keeps the poster's aspect and pads with black.
  resize: str = "stretch"
  # Augmentation (training only).
  random_crop: bool = False
  crop_min_area: float = 0.6
  horizontal_flip: bool = False
  color_jitter: float = 0.0  # max relative change of brightness/contrast/saturation

  def __post_init__(self):
    if self.resize not in ("stretch", "pad"):
      raise ValueError(f"resize must be 'stretch' or 'pad', not {self.resize!r}")


def decode_image(data: bytes, height: int, width: int, resize: str = "stretch",
                 crop_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Encoded image -> uint8 (height, width, 3).

  `crop_box` (left, upper, right, lower) in source pixels is applied first.
  """
  img = Image.open(io.BytesIO(data))
  # JPEG can decode at 1/2, 1/4, 1/8 scale for almost free when shrinking.
  if crop_box is None:
    img.draft("RGB", (width, height))
  img = img.convert("RGB")
  if crop_box is not None:
    img = img.crop(crop_box)
  if resize == "pad":
    scale = min(width / img.width, height / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(img.resize((w, h), Image.BILINEAR),
                 ((width - w) // 2, (height - h) // 2))
    img = canvas
  elif img.size != (width, height):
    img = img.resize((width, height), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def _random_crop_box(rng: np.random.Generator, size: tuple[int, int],
                     min_area: float) -> tuple[int, int, int, int]:
  """A random box covering [min_area, 1] of the image, aspect in [3/4, 4/3]."""
  w, h = size
  area = rng.uniform(min_area, 1.0) * w * h
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  cw = int(min(w, round(np.sqrt(area * aspect))))
  ch = int(min(h, round(np.sqrt(area / aspect))))
  x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
  return int(x), int(y), int(x + cw), int(y + ch)


def _jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Random brightness, contrast and saturation, each by up to +-strength."""
  x = image.astype(np.float32)
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
  gray = x.mean(axis=-1, keepdims=True)
  x = gray + (x - gray) * s
  x = (x - x.mean()) * c + x.mean()
  x = x * b
  return np.clip(x, 0, 255).astype(np.uint8)


class ParseAndDecode(grain.transforms.Map):
  """Serialised Example -> {'image', 'labels'}, deterministic (eval, no augmentation)."""

  def __init__(self, opts: ImageOptions):
    self.opts = opts

  def map(self, record: bytes) -> dict:
    ex = records.decode_example(record)
    image = decode_image(ex["image"], self.opts.height, self.opts.width, self.opts.resize)
    return {"image": image, "labels": ex["labels"]}


class ParseDecodeAugment(grain.transforms.RandomMap):
  """Serialised Example -> {'image', 'labels'} with training augmentation."""

  def __init__(self, opts: ImageOptions):
    self.opts = opts

  def random_map(self, record: bytes, rng: np.random.Generator) -> dict:
    o = self.opts
    ex = records.decode_example(record)
    box = None
    if o.random_crop:
      with Image.open(io.BytesIO(ex["image"])) as probe:
        box = _random_crop_box(rng, probe.size, o.crop_min_area)
    image = decode_image(ex["image"], o.height, o.width, o.resize, crop_box=box)
    if o.horizontal_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    if o.color_jitter > 0:
      image = _jitter(image, rng, o.color_jitter)
    return {"image": np.ascontiguousarray(image), "labels": ex["labels"]}


def _add_train_fields(batch: dict) -> dict:
  n = len(batch["labels"])
  batch["mask"] = np.ones((n,), dtype=bool)
  batch["index"] = np.full((n,), -1, dtype=np.int64)
  return batch


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                     f"number of processes ({process_count})")
  return global_batch_size // process_count


def _read_options(batch: int) -> grain.ReadOptions:
  """Decoding threads and a read-ahead of two batches of decoded examples.

  The read-ahead is per process (the main one, or each worker): grain's default,
  500 elements, would hold 500 decoded posters (75 MB at 224x224) or, placed
  after batching, 500 batches (2.4 GB at batch 32).
  """
  return grain.ReadOptions(num_threads=16, prefetch_buffer_size=2 * batch)


@functools.cache
def _release_shared_memory_at_exit() -> None:
  """Unlinks the workers' batch buffers before the interpreter exits.

  Batches come from the workers in shared memory that grain unlinks on a
  background thread as the arrays are freed; a process exiting before that
  thread catches up leaves the unlinking to multiprocessing's resource tracker,
  which does it but warns of "leaked shared_memory objects". The thread pool is
  grain internals, hence the guarded lookup: should it move, the only cost is
  the warning again.
  """

  def release():
    gc.collect()  # frees the arrays still referenced only by cycles
    try:
      from grain._src.python.ipc import shared_memory_array
      pool = shared_memory_array.SharedMemoryArray._del_thread_pool
    except (ImportError, AttributeError):
      return
    if pool is not None:
      pool.close()
      pool.join()
      # Arrays freed later in shutdown are then unlinked synchronously.
      shared_memory_array.SharedMemoryArray._del_thread_pool = None

  atexit.register(release)


def _multiprocess(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers <= 0:
    return ds
  # grain's worker processes read grain's absl flags; outside an absl app
  # (notebooks, tests, library use) they were never parsed, so take defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  _release_shared_memory_at_exit()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=workers.exit_with_parent)


def train_dataset(data_dir: str | os.PathLike, split: str, *, global_batch_size: int,
                  image: ImageOptions, seed: int, num_workers: int = 0,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """An endless, shuffled, augmented stream of this process's training batches.

  Iterating it gives a checkpointable `grain.DatasetIterator`; its
  `get_state()` / `set_state()` resume exactly mid-epoch.
  """
  meta = records.read_metadata(data_dir)
  source = tfrecord.TFRecordSource(records.split_files(data_dir, meta, split))
  batch = local_batch_size(global_batch_size, process_count)
  usable = len(source) // process_count * process_count
  if usable // process_count < batch:
    raise ValueError(
        f"split {split!r} of {data_dir} has {len(source)} examples: too few for "
        f"a per-process batch of {batch} on {process_count} process(es)")
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds[:usable][process_index::process_count].repeat(None)
  augment = image.random_crop or image.horizontal_flip or image.color_jitter > 0
  if augment:
    ds = ds.random_map(ParseDecodeAugment(image), seed=seed + 1)
  else:
    ds = ds.map(ParseAndDecode(image))
  ds = ds.to_iter_dataset(_read_options(batch)).batch(batch, drop_remainder=True)
  return _multiprocess(ds.map(_add_train_fields), num_workers)


class _PaddedLookup(grain.transforms.Map):
  """Position i of this process's padded shard -> example with mask and index."""

  def __init__(self, source: tfrecord.TFRecordSource, opts: ImageOptions,
               num_classes: int, process_index: int, process_count: int):
    self.source, self.decode = source, ParseAndDecode(opts)
    self.opts, self.num_classes = opts, num_classes
    self.process_index, self.process_count = process_index, process_count

  def map(self, i: int) -> dict:
    index = int(i) * self.process_count + self.process_index
    if index < len(self.source):
      ex = self.decode.map(self.source[index])
      return {**ex, "mask": np.bool_(True), "index": np.int64(index)}
    return {"image": np.zeros((self.opts.height, self.opts.width, 3), np.uint8),
            "labels": np.zeros((self.num_classes,), np.uint8),
            "mask": np.bool_(False), "index": np.int64(-1)}


def eval_dataset(data_dir: str | os.PathLike, split: str, *, global_batch_size: int,
                 image: ImageOptions, num_workers: int = 0, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """One pass over a split in order: every example exactly once across processes.

  Every process yields the same number of batches; positions past the end
  are padding with mask False, so metrics count each poster once.
  """
  meta = records.read_metadata(data_dir)
  source = tfrecord.TFRecordSource(records.split_files(data_dir, meta, split))
  batch = local_batch_size(global_batch_size, process_count)
  per_process = -(-len(source) // process_count)
  num_batches = -(-per_process // batch)
  ds = grain.MapDataset.range(num_batches * batch).map(
      _PaddedLookup(source, image, meta.num_classes, process_index, process_count))
  ds = ds.to_iter_dataset(_read_options(batch)).batch(batch)
  return _multiprocess(ds, num_workers)


def eval_num_batches(data_dir: str | os.PathLike, split: str, *,
                     global_batch_size: int, process_count: int = 1) -> int:
  meta = records.read_metadata(data_dir)
  n = meta.splits[split].num_examples
  batch = local_batch_size(global_batch_size, process_count)
  return -(-(-(-n // process_count)) // batch)
