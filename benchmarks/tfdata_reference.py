"""The input pipeline in tf.data on the CPU: the reference benchmarks/input_throughput.py
compares the grain pipeline against, on the same converted dataset in the same run.

Not a dependency of poster_cnn: run it with a Python that has TensorFlow (for example a
throwaway venv with `pip install tensorflow-cpu`). It reads the converter's TFRecord
shards the way a tf.data user would: shards interleaved, records shuffled (a buffer of
--shuffle_buffer), parsed, decoded (`tf.io.decode_jpeg`, or `tf.io.decode_raw` for
`--image_format=raw` datasets), resized to --image x --image (`tf.image.resize`,
bilinear) and cast back to uint8, batched and prefetched, every stage AUTOTUNE. Each
epoch is a full pass over the split; it prints one line per epoch and a summary:

  epoch framework=tf-2.21.0 epoch=1 images=1984 seconds=0.71 cpu_s=1.38 img_per_s=2794.4
  tfdata framework=tf-2.21.0 examples=2000 epochs=4 img_per_s_median=... img_per_s_max=...

    /tmp/tfvenv/bin/python benchmarks/tfdata_reference.py --data_dir=DATA --epochs=4
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def dataset(data_dir: str, split: str, image: int, batch: int, shuffle_buffer: int,
            seed: int) -> tuple[tf.data.Dataset, int]:
  """The tf.data pipeline and the split's number of examples."""
  with open(os.path.join(data_dir, "metadata.json")) as f:
    meta = json.load(f)
  num_classes = len(meta["vocabulary"])
  raw = meta.get("image_format", "jpeg") == "raw"
  stored = meta.get("image_size")
  files = sorted(glob.glob(os.path.join(data_dir, f"movie_posters-{split}.tfrecord-*")))
  if not files:
    raise SystemExit(f"{data_dir}: no shards of split {split!r}")
  spec = {"image": tf.io.FixedLenFeature([], tf.string),
          "labels": tf.io.FixedLenFeature([num_classes], tf.int64)}
  autotune = tf.data.AUTOTUNE

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    if raw:
      pixels = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), (*stored, 3))
    else:
      pixels = tf.io.decode_jpeg(ex["image"], channels=3)
    pixels = tf.image.resize(pixels, (image, image))
    return tf.saturate_cast(pixels, tf.uint8), tf.cast(ex["labels"], tf.uint8)

  ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=autotune,
                     num_parallel_calls=autotune, deterministic=False)
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.map(parse, num_parallel_calls=autotune, deterministic=False)
  ds = ds.batch(batch, drop_remainder=True).prefetch(autotune)
  return ds, sum(1 for f in files for _ in tf.data.TFRecordDataset(f))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--split", default="train")
  parser.add_argument("--image", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--shuffle_buffer", type=int, default=1024)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  ds, n = dataset(args.data_dir, args.split, args.image, args.batch, args.shuffle_buffer,
                  args.seed)
  name = f"tf-{tf.__version__}"
  rates = []
  for epoch in range(args.epochs):
    images, start, start_cpu = 0, time.perf_counter(), time.process_time()
    for pixels, _ in ds:
      images += int(pixels.shape[0])
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    rates.append(images / seconds)
    print(f"epoch framework={name} epoch={epoch} images={images} seconds={seconds:.3f} "
          f"cpu_s={cpu:.3f} img_per_s={rates[-1]:.1f}", flush=True)
  print(f"tfdata framework={name} examples={n} epochs={args.epochs} "
        f"img_per_s_median={statistics.median(rates):.1f} img_per_s_max={max(rates):.1f}",
        flush=True)


if __name__ == "__main__":
  main()
