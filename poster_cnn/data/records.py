"""The on-disk poster dataset: Example schema and TFDS directory layout.

A converted dataset directory is a TFDS dataset directory::

    dataset_info.json     tfds DatasetInfo proto: splits, shard lengths, bytes
    features.json         tfds FeaturesDict: image, id, title, labels, genres
    metadata.json         genre vocabulary, per-split positives, conversion args
    movie_posters-train.tfrecord-00000-of-00004 ...

so `tfds.builder_from_directory(dir)` loads it where TensorFlow is installed
and `tf.data.TFRecordDataset` reads every shard. Here, without TensorFlow, we
serialise and parse `tf.train.Example` with the protos TFDS vendors.

Each Example holds:
  image   bytes   encoded JPEG (RGB), or uint8 pixels (H, W, 3) where metadata.json
                  says "image_format": "raw"
  id      bytes   the poster's id (imdbId for the Kaggle set)
  title   bytes   the movie title, may be empty
  labels  int64   (num_genres,) multi-hot over the vocabulary
  genres  bytes   (n,) the example's genre names, in vocabulary order
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from google.protobuf import json_format
from tensorflow_datasets.core.proto import dataset_info_generated_pb2 as info_pb2
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

from poster_cnn import storage

DATASET_NAME = "movie_posters"
VERSION = "1.0.0"
FILE_FORMAT = "tfrecord"
INFO_FILE = "dataset_info.json"
FEATURES_FILE = "features.json"
METADATA_FILE = "metadata.json"


def shard_filename(split: str, shard: int, num_shards: int) -> str:
  return f"{DATASET_NAME}-{split}.{FILE_FORMAT}-{shard:05d}-of-{num_shards:05d}"


# ---------------------------------------------------------------- Examples


def encode_example(*, image: bytes, id: str, title: str, labels: np.ndarray,
                   vocabulary: Sequence[str]) -> bytes:
  """A serialised tf.train.Example for one poster.

  Args:
    image: encoded JPEG bytes.
    id: poster id.
    title: movie title ('' if unknown).
    labels: (num_genres,) multi-hot, any integer or bool dtype.
    vocabulary: genre names, same order as `labels`.
  """
  labels = np.asarray(labels).astype(np.int64)
  ex = example_pb2.Example()
  feature = ex.features.feature
  feature["image"].bytes_list.value.append(image)
  feature["id"].bytes_list.value.append(id.encode("utf-8"))
  feature["title"].bytes_list.value.append(title.encode("utf-8"))
  feature["labels"].int64_list.value.extend(labels.tolist())
  feature["genres"].bytes_list.value.extend(
      vocabulary[i].encode("utf-8") for i in np.flatnonzero(labels))
  # Sorted map keys: the same poster always serialises to the same bytes.
  return ex.SerializeToString(deterministic=True)


def decode_example(record: bytes) -> dict:
  """Parses a serialised Example into {'image': bytes, 'id': str, 'title': str,
  'labels': uint8 (num_genres,)}."""
  ex = example_pb2.Example.FromString(record)
  feature = ex.features.feature
  return {
      "image": feature["image"].bytes_list.value[0],
      "id": feature["id"].bytes_list.value[0].decode("utf-8"),
      "title": feature["title"].bytes_list.value[0].decode("utf-8"),
      "labels": np.asarray(feature["labels"].int64_list.value, dtype=np.uint8),
  }


# ---------------------------------------------------------------- Metadata


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  name: str
  num_examples: int
  shard_lengths: tuple[int, ...]
  num_bytes: int
  positives: tuple[int, ...]  # per genre, in vocabulary order

  @property
  def num_shards(self) -> int:
    return len(self.shard_lengths)

  def filenames(self) -> list[str]:
    return [shard_filename(self.name, i, self.num_shards)
            for i in range(self.num_shards)]


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  """What a reader needs to know about a converted dataset."""

  vocabulary: tuple[str, ...]
  splits: dict[str, SplitInfo]
  image_size: tuple[int, int] | None  # (height, width) if resized at conversion
  extra: dict = dataclasses.field(default_factory=dict)  # conversion args, report

  @property
  def num_classes(self) -> int:
    return len(self.vocabulary)


def _features_dict(vocabulary: Sequence[str], image_size: tuple[int, int] | None,
                   image_format: str = "jpeg"):
  # Imported lazily: tfds' feature classes are only needed when writing.
  import tensorflow_datasets as tfds
  h, w = image_size if image_size else (None, None)
  if image_format == "raw":  # uint8 pixels, as the converter's --image_format=raw writes
    image = tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8, encoding="bytes")
  else:
    image = tfds.features.Image(shape=(h, w, 3), encoding_format="jpeg")
  return tfds.features.FeaturesDict({
      "image": image,
      "id": tfds.features.Text(),
      "title": tfds.features.Text(),
      "labels": tfds.features.Tensor(shape=(len(vocabulary),), dtype=np.int64),
      "genres": tfds.features.Sequence(tfds.features.Text()),
  })


def write_metadata(directory: str | os.PathLike, meta: DatasetMetadata,
                   description: str = "") -> None:
  """Writes dataset_info.json, features.json and metadata.json into `directory`."""
  directory = storage.path(directory)
  features = _features_dict(meta.vocabulary, meta.image_size,
                            meta.extra.get("image_format", "jpeg"))
  info = info_pb2.DatasetInfo(
      name=DATASET_NAME, version=VERSION, file_format=FILE_FORMAT,
      description=description or "Movie posters with multi-hot genre labels.",
      module_name="poster_cnn.data.convert")
  info.features.CopyFrom(features.to_proto())
  for split in meta.splits.values():
    info.splits.add(
        name=split.name, shard_lengths=list(split.shard_lengths),
        num_bytes=split.num_bytes,
        filepath_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
  (directory / INFO_FILE).write_text(json_format.MessageToJson(info, indent=2))
  features.save_config(os.fspath(directory))
  metadata = {
      "vocabulary": list(meta.vocabulary),
      "image_size": list(meta.image_size) if meta.image_size else None,
      "splits": {
          s.name: {"num_examples": s.num_examples,
                   "positives": dict(zip(meta.vocabulary, s.positives))}
          for s in meta.splits.values()
      },
      **meta.extra,
  }
  (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def read_metadata(directory: str | os.PathLike) -> DatasetMetadata:
  """Reads a converted dataset's metadata, with errors that name the file.

  `directory` may be local, gs:// or s3:// (poster_cnn/storage.py).
  """
  directory = storage.path(directory)
  info_path, meta_path = directory / INFO_FILE, directory / METADATA_FILE
  for path in (info_path, meta_path):
    if not path.exists():
      raise FileNotFoundError(
          f"{path} not found: is {directory} a dataset written by "
          "poster-cnn-convert?")
  try:
    info = json_format.Parse(info_path.read_text(), info_pb2.DatasetInfo())
    meta = json.loads(meta_path.read_text())
    vocabulary = tuple(meta["vocabulary"])
    splits = {}
    for s in info.splits:
      positives = meta["splits"][s.name]["positives"]
      splits[s.name] = SplitInfo(
          name=s.name, num_examples=sum(s.shard_lengths),
          shard_lengths=tuple(s.shard_lengths), num_bytes=s.num_bytes,
          positives=tuple(positives[g] for g in vocabulary))
  except (json.JSONDecodeError, json_format.ParseError, KeyError) as e:
    raise ValueError(f"{directory}: malformed dataset metadata: {e!r}") from e
  extra = {k: v for k, v in meta.items()
           if k not in ("vocabulary", "image_size", "splits")}
  image_size = tuple(meta["image_size"]) if meta.get("image_size") else None
  return DatasetMetadata(vocabulary=vocabulary, splits=splits,
                         image_size=image_size, extra=extra)


def split_files(directory: str | os.PathLike, meta: DatasetMetadata,
                split: str) -> list[str]:
  """Paths of a split's shards; checks that they exist."""
  if split not in meta.splits:
    raise ValueError(f"{directory} has no split {split!r}; it has "
                     f"{sorted(meta.splits)}")
  paths = [os.fspath(storage.path(directory) / f) for f in meta.splits[split].filenames()]
  missing = [p for p in paths if not epath.Path(p).exists()]
  if missing:
    raise FileNotFoundError(f"missing shards of split {split!r}: {missing}")
  return paths
