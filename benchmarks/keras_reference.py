"""The paper model's train step in Keras on TensorFlow (the seed paper's framework) on the CPU.

Not a dependency of poster_cnn: run it with a Python that has TensorFlow (for example a
throwaway venv with `pip install tensorflow-cpu numpy`). It builds the seed paper's network
as `poster_cnn.model.PosterCNN` does (same layers, widths, BatchNorm settings and dropout),
NHWC, with Adam (Keras' defaults) and binary cross-entropy on random uint8 batches scaled
to [0, 1] inside the step, and times `train_on_batch` with XLA off (`jit_compile=False`,
TensorFlow's oneDNN kernels) or on, and the eval-mode forward (`predict_on_batch`).
TensorFlow's thread pools are set before it starts: --intra_op threads per op (default 2,
this machine's cores) and --inter_op ops at once (default 1): the best measured on the
2-core VM (docs/BENCHMARKS.md). Prints lines in the format of
benchmarks/train_throughput.py:

  train framework=keras-3.15.1-tf-2.21.0 device=cpu jit_compile=0 intra_op=2 inter_op=1
        batch=32 image=224 step_ms=... img_per_s=...
  eval framework=... batch=32 image=224 step_ms=... img_per_s=...

Compare with the JAX step in the same run (docs/BENCHMARKS.md has the interleaved command).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from timing import print_step_rate  # noqa: E402


def paper_cnn(num_classes: int, image: int) -> keras.Model:
  layers = [keras.Input((image, image, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255)]
  for features, rate in zip((16, 32, 64, 128), (0.1, 0.0, 0.2, 0.0)):
    layers += [keras.layers.Conv2D(features, 3, padding="same", activation="relu"),
               keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3),
               keras.layers.MaxPooling2D(2)]
    if rate:
      layers.append(keras.layers.Dropout(rate))
  layers.append(keras.layers.Flatten())
  for _ in range(2):
    layers += [keras.layers.Dense(128, activation="relu"),
               keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3),
               keras.layers.Dropout(0.5)]
  layers.append(keras.layers.Dense(num_classes))
  return keras.Sequential(layers)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_sizes", default="32")
  parser.add_argument("--image", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=13)
  parser.add_argument("--steps", type=int, default=5, help="Steps per timed window.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed windows; median printed.")
  parser.add_argument("--jit_compile", type=int, default=0, help="1 = XLA on.")
  parser.add_argument("--intra_op", type=int, default=2, help="Threads per op; 0 = TF's default.")
  parser.add_argument("--inter_op", type=int, default=1, help="Ops at once; 0 = TF's default.")
  parser.add_argument("--eval", type=int, default=1, help="1 = also time the eval forward.")
  args = parser.parse_args()
  # Only takes effect before TensorFlow creates its thread pools (the first op).
  tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
  tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
  keras.utils.set_random_seed(0)
  version = f"keras-{keras.__version__}-tf-{tf.__version__}"
  for batch_size in map(int, args.batch_sizes.split(",")):
    model = paper_cnn(args.num_classes, args.image)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  jit_compile=bool(args.jit_compile))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, args.image, args.image, 3), dtype=np.uint8)
    labels = (rng.random((batch_size, args.num_classes)) < 0.2).astype(np.float32)
    images, labels = tf.constant(images), tf.constant(labels)

    def run_steps(n):
      for _ in range(n):
        model.train_on_batch(images, labels)  # returns the loss: a host sync

    run_steps(1)
    setting = (f"framework={version} device=cpu jit_compile={args.jit_compile} "
               f"intra_op={args.intra_op} inter_op={args.inter_op} batch={batch_size} "
               f"image={args.image}")
    print_step_rate("train", setting, run_steps, batch_size, args.repeats, args.steps)
    if args.eval:
      def run_eval(n):
        for _ in range(n):
          np.asarray(model.predict_on_batch(images))  # eval mode: running BatchNorm statistics

      run_eval(1)
      print_step_rate("eval", setting, run_eval, batch_size, args.repeats, args.steps)


if __name__ == "__main__":
  main()
