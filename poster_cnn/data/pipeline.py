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

Work per batch, not per example: the shuffled, sharded sequence of record indices
is cut into batches before anything is read (`MapDataset.batch`), and one call
(`DecodeBatch`) reads, parses and decodes a whole batch into one array, with no
per-example grain machinery and no stacking copy. Augmentation and any resize
beyond decoding happen on the device (`poster_cnn.preprocess`), so the host work
is deterministic and the iterator state is still a position in the sequence.

Batches are dicts of host-local numpy arrays:
  image   uint8  (local_batch, H, W, 3)            at `carrier_size` (the stored
                                                   size, else the training size)
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
import grain.multiprocessing
import numpy as np
import simplejpeg
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
  # Augmentation (training only, on the device: poster_cnn/preprocess.py).
  random_crop: bool = False
  crop_min_area: float = 0.6
  horizontal_flip: bool = False
  color_jitter: float = 0.0  # max relative change of brightness/contrast/saturation

  def __post_init__(self):
    if self.resize not in ("stretch", "pad"):
      raise ValueError(f"resize must be 'stretch' or 'pad', not {self.resize!r}")


def _decode_jpeg(data, height: int, width: int, out: np.ndarray | None = None):
  """libjpeg-turbo through simplejpeg: RGB uint8 at the smallest DCT scale still at least
  height x width, written into `out` when given (and the right size); None if `data` is
  not a JPEG it decodes. The same pixels as PIL's decoder at scale 1 (both are
  libjpeg-turbo's default), about 1.9x faster: no PIL image object and no copy out of it.
  """
  if bytes(data[:2]) != b"\xff\xd8":
    return None
  try:
    if out is not None:
      h, w, _, _ = simplejpeg.decode_jpeg_header(data, min_height=height, min_width=width)
      if (h, w) != out.shape[:2]:
        return None
      return simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width,
                                    buffer=out)
    return simplejpeg.decode_jpeg(data, "RGB", min_height=height, min_width=width)
  except ValueError:  # CMYK, arithmetic coding, ...: PIL handles those
    return None


def decode_image(data: bytes, height: int, width: int, resize: str = "stretch") -> np.ndarray:
  """Encoded image -> uint8 (height, width, 3), resized with PIL if it is another size."""
  # JPEG can decode at 1/2, 1/4, 1/8 scale for almost free when shrinking.
  pixels = _decode_jpeg(data, height, width)
  if pixels is not None and pixels.shape[:2] == (height, width):
    return pixels
  if pixels is not None:
    img = Image.fromarray(pixels)
  else:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (width, height))
    if img.mode != "RGB":
      img = img.convert("RGB")
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


def decode_stored(data, size: tuple[int, int], fmt: str = "jpeg", resize: str = "stretch",
                  out: np.ndarray | None = None) -> np.ndarray:
  """One image as a dataset stores it -> uint8 (H, W, 3) at `size`, the carrier size.

  The host's one decode, for training, evaluation and prediction alike (prediction
  passes a file through `images.to_stored` with the dataset's options first): a JPEG
  at `size` is decoded by libjpeg-turbo straight into `out`, one of another size is
  resized with PIL (`decode_image`), raw pixels ('raw') are copied. Written into
  `out` when given. Raises ValueError for raw pixels of another size.
  """
  h, w = size
  if out is None:
    out = np.empty((h, w, 3), np.uint8)
  if fmt == "raw":
    pixels = np.frombuffer(data, np.uint8)
    if pixels.size != h * w * 3:
      raise ValueError(f"raw image of {pixels.size} bytes: the dataset's metadata says "
                       f"{h}x{w}x3")
    out[...] = pixels.reshape(h, w, 3)
  elif _decode_jpeg(data, h, w, out=out) is None:
    out[...] = decode_image(data, h, w, resize)
  return out


def carrier_size(stored_size: tuple[int, int] | None, opts: ImageOptions,
                 fmt: str = "jpeg") -> tuple[int, int]:
  """(height, width) at which the pipeline ships a dataset's posters to the device, from
  the size they are stored at (`DatasetMetadata.image_size`, None if mixed) and how
  (`image_format`).

  Stored at one size by the converter (`--image_size`), the host only decodes (or,
  stored raw, copies) and the device resizes (`poster_cnn.preprocess`): JPEGs at the
  smallest DCT scale (n/8) still at least the training size in both dimensions, which
  libjpeg-turbo decodes for a fraction of a full decode (268x182 posters at 5/8, 168x114,
  for 96x96 training), raw pixels at their size. Posters of mixed sizes come at the
  training size, resized on the host.
  """
  if not stored_size:
    return opts.height, opts.width
  if fmt == "raw":
    return tuple(stored_size)
  return _dct_scaled_size(tuple(stored_size), (opts.height, opts.width))


@functools.cache
def _dct_scaled_size(stored: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
  """The size libjpeg-turbo decodes a `stored`-size JPEG at when asked for at least
  `target` (as `_decode_jpeg` asks): `stored` itself when the target is not smaller."""
  probe = simplejpeg.encode_jpeg(np.zeros((*stored, 3), np.uint8))
  h, w, _, _ = simplejpeg.decode_jpeg_header(probe, min_height=target[0],
                                             min_width=target[1])
  return h, w


def image_format(meta: records.DatasetMetadata) -> str:
  """'jpeg' or 'raw' (uint8 pixels at the stored size): how the Examples hold images."""
  return meta.extra.get("image_format", "jpeg")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7


def _fields(buf: memoryview, start: int, end: int):
  """(field number, start, end) of each length-delimited field of buf[start:end]."""
  pos = start
  while pos < end:
    key, pos = _varint(buf, pos)
    if key & 7 != 2:
      raise ValueError("not a length-delimited field")
    n, pos = _varint(buf, pos)
    if pos + n > end:
      raise ValueError("field runs past its message")
    yield key >> 3, pos, pos + n
    pos += n


def image_and_labels(record: bytes) -> tuple[memoryview | bytes, np.ndarray]:
  """A serialised Example's image bytes (a view into `record`, not a copy) and its
  labels, uint8 (num_genres,).

  Walks the protobuf wire format of tf.train.Example (features -> feature map ->
  bytes_list / packed int64_list) instead of parsing every field into Python objects:
  for raw-pixel datasets the parse's copy of each 150 KB image was as costly as reading
  it. Anything it does not expect (labels beyond 0/1, unpacked lists, a foreign
  writer's layout) goes through the full parser, `records.decode_example`.
  """
  buf = memoryview(record)
  image = labels = None
  try:
    for _, s, e in _fields(buf, 0, len(buf)):  # Example.features
      for _, s2, e2 in _fields(buf, s, e):  # Features.feature: map entries
        name = value = None
        for f3, s3, e3 in _fields(buf, s2, e2):
          if f3 == 1:
            name = buf[s3:e3].tobytes()
          else:
            value = (s3, e3)
        if name in (b"image", b"labels") and value is not None:
          (kind, s4, e4), = _fields(buf, *value)  # Feature: bytes_list 1, int64_list 3
          (_, s5, e5), = _fields(buf, s4, e4)  # the list's one value / packed values
          if name == b"image" and kind == 1:
            image = buf[s5:e5]
          elif name == b"labels" and kind == 3:
            labels = np.frombuffer(buf[s5:e5], np.uint8)  # 0/1 varints are single bytes
  except ValueError:
    image = None
  if image is None or labels is None or (labels.size and labels.max() > 1):
    ex = records.decode_example(record)
    return ex["image"], ex["labels"]
  return image, labels


class DecodeBatch:
  """Serialised Examples -> one batch {'image' uint8 (n, H, W, 3), 'labels' uint8 (n, K)}.

  Batch-level, in whichever process grain runs it: one call per batch, images written
  straight into the batch's array. Deterministic: augmentation happens on the device.
  With `shared_memory` (in input worker processes) that array is allocated in shared
  memory, which grain hands to the training process as it is: no copy into shared
  memory after decoding.
  """

  def __init__(self, size: tuple[int, int], fmt: str, resize: str = "stretch",
               shared_memory: bool = False):
    if fmt not in ("jpeg", "raw"):
      raise ValueError(f"unknown image format {fmt!r} in the dataset's metadata")
    self.size, self.fmt, self.resize = tuple(size), fmt, resize
    self.shared_memory = shared_memory

  def images(self, n: int) -> np.ndarray:
    """An uninitialised uint8 (n, H, W, 3) batch array (in shared memory if asked)."""
    shape = (n, *self.size, 3)
    if self.shared_memory:
      return grain.multiprocessing.SharedMemoryArray(shape, np.uint8)
    return np.empty(shape, np.uint8)

  def decode(self, serialised: list[bytes], num_classes: int | None = None,
             images: np.ndarray | None = None) -> dict:
    """Decodes into `images` (uint8 (len(serialised), H, W, 3)) when given."""
    images = self.images(len(serialised)) if images is None else images
    labels = []
    for i, record in enumerate(serialised):
      image, label = image_and_labels(record)
      labels.append(label)
      try:
        decode_stored(image, self.size, self.fmt, self.resize, out=images[i])
      except ValueError as e:
        raise ValueError(f"poster {records.decode_example(record)['id']!r}: {e}") from None
    if labels:
      labels = np.stack(labels)
    else:
      labels = np.zeros((0, num_classes or 0), np.uint8)
    return {"image": images, "labels": labels}

  def __call__(self, serialised: list[bytes]) -> dict:
    batch = self.decode(serialised)
    n = len(serialised)
    batch["mask"] = np.ones((n,), dtype=bool)
    batch["index"] = np.full((n,), -1, dtype=np.int64)
    return batch


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                     f"number of processes ({process_count})")
  return global_batch_size // process_count


def _read_options(num_workers: int) -> grain.ReadOptions:
  """Threads decoding whole batches, each thread one batch, and as many batches read
  ahead (per process: the main one, or each worker).

  In the main process the threads are the parallelism (PIL and the copies release the
  GIL); grain's default read-ahead, 500 elements, would here be 500 batches (2.4 GB at
  batch 32, 224x224). A worker process takes one core and reads no batch ahead itself:
  grain's queue to the training process is its read-ahead, and a batch decoded into
  shared memory (`DecodeBatch`) goes straight into it, where grain unlinks what is left
  at exit; held in a read-ahead buffer of the worker it would outlive a stopped worker.
  """
  if num_workers > 0:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  threads = max(1, len(os.sched_getaffinity(0)))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads + 1)


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
  fmt = image_format(meta)
  decode = DecodeBatch(carrier_size(meta.image_size, image, fmt), fmt, image.resize,
                       shared_memory=num_workers > 0)
  ds = ds.batch(batch, drop_remainder=True, batch_fn=decode)
  return _multiprocess(ds.to_iter_dataset(_read_options(num_workers)), num_workers)


class _PaddedBatch(grain.transforms.Map):
  """Batch b of this process's padded shard -> its examples, with mask and index."""

  def __init__(self, source: tfrecord.TFRecordSource, decode: DecodeBatch, batch: int,
               num_classes: int, process_index: int, process_count: int):
    self.source, self.decode, self.batch = source, decode, batch
    self.num_classes = num_classes
    self.process_index, self.process_count = process_index, process_count

  def map(self, b: int) -> dict:
    positions = np.arange(int(b) * self.batch, (int(b) + 1) * self.batch)
    index = positions * self.process_count + self.process_index
    mask = index < len(self.source)
    real = int(mask.sum())  # a prefix: padding only ever ends the last batch
    image = self.decode.images(self.batch)
    image[real:] = 0
    decoded = self.decode.decode([self.source[int(i)] for i in index[:real]],
                                 self.num_classes, images=image[:real])
    labels = np.zeros((self.batch, self.num_classes), np.uint8)
    labels[:real] = decoded["labels"]
    return {"image": image, "labels": labels, "mask": mask,
            "index": np.where(mask, index, -1).astype(np.int64)}


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
  fmt = image_format(meta)
  decode = DecodeBatch(carrier_size(meta.image_size, image, fmt), fmt, image.resize,
                       shared_memory=num_workers > 0)
  ds = grain.MapDataset.range(num_batches).map(
      _PaddedBatch(source, decode, batch, meta.num_classes, process_index, process_count))
  return _multiprocess(ds.to_iter_dataset(_read_options(num_workers)), num_workers)


def eval_num_batches(data_dir: str | os.PathLike, split: str, *,
                     global_batch_size: int, process_count: int = 1) -> int:
  meta = records.read_metadata(data_dir)
  n = meta.splits[split].num_examples
  batch = local_batch_size(global_batch_size, process_count)
  return -(-(-(-n // process_count)) // batch)
