"""The paper model's train step in PyTorch on the CPU: the reference for the JAX step.

Not a dependency of poster_cnn: run it with a Python that has torch (for example a
throwaway venv with `pip install torch numpy`). It builds the same network as
`poster_cnn.model.PosterCNN` (same layers, widths, BatchNorm momentum/epsilon and
dropout), channels-last (faster than contiguous NCHW on a 2-core CPU), eager or
`torch.compile`d (--compile=1, inductor), with Adam (Keras' defaults) and binary
cross-entropy on random uint8
batches scaled to [0, 1] inside the step, as the JAX step does. Prints lines in
the format of benchmarks/train_throughput.py:

  train framework=pytorch-2.13.0 device=cpu threads=2 channels_last=1 compile=0 batch=32
        image=224 step_ms=711.4 img_per_s=45.0
  eval framework=... batch=32 image=224 step_ms=... img_per_s=...

The eval line times the forward in eval mode (running BatchNorm statistics, no dropout)
under `torch.inference_mode()`.

Compare with the JAX step in the same run (the machine is shared; see
docs/BENCHMARKS.md for the interleaved command).

`--layers` instead times each conv layer's parts alone, as benchmarks/conv_layers.py does
for the JAX formulations (forward, input gradient, kernel gradient; channels-last):

  conv_layer layer=2 hw=112 cin=16 cout=32 batch=32 part=dw impl=pytorch-2.13.0 ms=...
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from timing import median_step_seconds, print_step_rate  # benchmarks/timing.py


def paper_cnn(num_classes: int, image: int) -> nn.Module:
  layers, cin = [], 3
  for features, rate in zip((16, 32, 64, 128), (0.1, 0.0, 0.2, 0.0)):
    # Keras momentum 0.99 is PyTorch momentum 0.01.
    layers += [nn.Conv2d(cin, features, 3, padding=1), nn.ReLU(),
               nn.BatchNorm2d(features, eps=1e-3, momentum=0.01), nn.MaxPool2d(2)]
    if rate:
      layers.append(nn.Dropout(rate))
    cin = features
  layers.append(nn.Flatten())
  width = cin * (image // 16) ** 2
  for features in (128, 128):
    layers += [nn.Linear(width, features), nn.ReLU(),
               nn.BatchNorm1d(features, eps=1e-3, momentum=0.01), nn.Dropout(0.5)]
    width = features
  layers.append(nn.Linear(width, num_classes))
  return nn.Sequential(*layers)


def time_layers(batch: int, image: int, repeats: int) -> None:
  """Per conv layer of the paper model: forward, input and kernel gradients, each alone."""
  version = "pytorch-" + torch.__version__.split("+")[0]
  conv_args = dict(bias_sizes=None, stride=[1, 1], padding=[1, 1], dilation=[1, 1],
                   transposed=False, output_padding=[0, 0], groups=1)
  for layer, (cin, cout) in enumerate(((3, 16), (16, 32), (32, 64), (64, 128)), start=1):
    hw = image >> (layer - 1)
    cl = torch.channels_last
    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=cl)
    dy = torch.randn(batch, cout, hw, hw).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, 3, 3) * 0.1).contiguous(memory_format=cl)
    parts = {
        "fwd": lambda: torch.nn.functional.conv2d(x, w, padding=1),
        "dx": lambda: torch.ops.aten.convolution_backward(
            dy, x, w, output_mask=[True, False, False], **conv_args)[0],
        "dw": lambda: torch.ops.aten.convolution_backward(
            dy, x, w, output_mask=[False, True, False], **conv_args)[1],
    }
    for part, fn in parts.items():
      if part == "dx" and layer == 1:
        continue  # the image needs no gradient
      fn()
      ms = median_step_seconds(lambda n, fn=fn: [fn() for _ in range(n)], repeats, 1) * 1e3
      print(f"conv_layer layer={layer} hw={hw} cin={cin} cout={cout} batch={batch} "
            f"part={part} impl={version} ms={ms:.1f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_sizes", default="32")
  parser.add_argument("--image", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=13)
  parser.add_argument("--steps", type=int, default=5, help="Steps per timed window.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed windows; median printed.")
  parser.add_argument("--channels_last", type=int, default=1)
  parser.add_argument("--compile", type=int, default=0, help="1 = torch.compile the model.")
  parser.add_argument("--eval", type=int, default=1, help="1 = also time the eval forward.")
  parser.add_argument("--layers", action="store_true",
                      help="Time each conv layer's forward, input and kernel gradients instead.")
  args = parser.parse_args()
  if args.layers:
    for batch_size in map(int, args.batch_sizes.split(",")):
      time_layers(batch_size, args.image, max(args.repeats, 5))
    return

  torch.manual_seed(0)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  for batch_size in map(int, args.batch_sizes.split(",")):
    module = paper_cnn(args.num_classes, args.image).to(memory_format=memory_format).train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    model = torch.compile(module) if args.compile else module
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(
        rng.integers(0, 256, (batch_size, 3, args.image, args.image), dtype=np.uint8)
    ).contiguous(memory_format=memory_format)
    labels = torch.from_numpy((rng.random((batch_size, args.num_classes)) < 0.2).astype(np.float32))

    def run_steps(n):
      for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images.float() / 255.0), labels)
        loss.backward()
        opt.step()
        loss.item()  # a host sync, as the JAX benchmark's block_until_ready

    run_steps(1)
    setting = (f"framework=pytorch-{torch.__version__.split('+')[0]} device=cpu "
               f"threads={torch.get_num_threads()} channels_last={args.channels_last} "
               f"compile={args.compile} batch={batch_size} image={args.image}")
    print_step_rate("train", setting, run_steps, batch_size, args.repeats, args.steps)
    if args.eval:
      module.eval()

      def run_eval(n):
        with torch.inference_mode():
          for _ in range(n):
            model(images.float() / 255.0).numpy()

      run_eval(1)  # compiles the eval graph when --compile
      print_step_rate("eval", setting, run_eval, batch_size, args.repeats, args.steps)


if __name__ == "__main__":
  main()
