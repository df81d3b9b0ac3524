"""Poster files -> validated RGB JPEG bytes or raw uint8 pixels (a decompression-bomb
limit, any PIL mode converted, an optional resize), streamed in order from a pool of
worker processes."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import itertools
import math
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from poster_cnn import interrupts
from poster_cnn.data import csv_rows, workers

# 40 MP is far above any poster scan yet keeps a worker's decoded image under 120 MB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_JPEG_QUALITY = 95
_CHUNK = 16  # images per worker task: amortises inter-process overhead


@dataclasses.dataclass(frozen=True)
class JpegOptions:
  """How convert_image encodes a poster."""

  size: tuple[int, int] | None  # (height, width); None keeps each poster's size
  quality: int
  max_pixels: int
  raw: bool = False  # uint8 pixels (height, width, 3) instead of JPEG; needs `size`


def dataset_options(data_dir: str | os.PathLike | None) -> JpegOptions:
  """The options the dataset at `data_dir` was converted with (its metadata records
  them); the converter's defaults when it cannot be read."""
  from poster_cnn.data import records  # here: the workers' imports stay light
  try:
    meta = records.read_metadata(data_dir)
  except (OSError, ValueError, TypeError) as e:
    logging.warning("dataset %s unreadable (%s): preparing images with the converter's "
                    "default options", data_dir, e)
    return JpegOptions(None, DEFAULT_JPEG_QUALITY, DEFAULT_MAX_IMAGE_PIXELS)
  args = meta.extra.get("conversion", {}).get("arguments", {})
  return JpegOptions(meta.image_size, int(args.get("jpeg_quality", DEFAULT_JPEG_QUALITY)),
                     int(args.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
                     raw=meta.extra.get("image_format", "jpeg") == "raw")


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
  """PIL refuses images over `max_pixels` (its warning made an error too)."""
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = max_pixels
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      yield
  finally:
    Image.MAX_IMAGE_PIXELS = old


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB; transparency composited on white."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit greyscale
    pixels = np.asarray(img, np.float64)
    if pixels.max(initial=0) > 255:
      pixels = pixels / 257
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
  return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _load(data: bytes, opts: JpegOptions) -> Image.Image:
  """A fully decoded PIL image; JPEGs at the smallest DCT scale still >= 2x `opts.size`."""
  with _pixel_limit(opts.max_pixels):
    img = Image.open(io.BytesIO(data))  # checks the pixel count in the header
    if opts.size and img.format == "JPEG":
      h, w = opts.size
      img.draft(None, (2 * w, 2 * h))  # DCT-domain downscale, kept >= 2x the target
    img.load()  # a full decode: truncation and corruption surface here
  return img


def _resized_rgb(img: Image.Image, opts: JpegOptions) -> Image.Image:
  # EXIF orientation is left alone, as TensorFlow's and the pipeline's decoders do.
  img = _to_rgb(img)
  if opts.size and img.size != opts.size[::-1]:
    # BICUBIC in PIL widens its kernel when shrinking, so it averages like area resampling.
    img = img.resize(opts.size[::-1], Image.BICUBIC)
  return img


def to_jpeg(data: bytes, opts: JpegOptions) -> bytes:
  """Validated RGB JPEG bytes: `data` itself when it already is one and no resize is
  asked, else decoded, converted and re-encoded.

  Raises what PIL raises for an unreadable file or one over `opts.max_pixels`.
  """
  img = _load(data, opts)
  if img.format == "JPEG" and img.mode == "RGB" and opts.size in (None, img.size[::-1]):
    return data
  out = io.BytesIO()
  _resized_rgb(img, opts).save(out, "JPEG", quality=opts.quality)
  return out.getvalue()


def to_raw(data: bytes, opts: JpegOptions) -> bytes:
  """uint8 RGB pixels (height, width, 3) in C order at `opts.size`, resized as to_jpeg
  resizes (--image_format=raw). Raises as to_jpeg does."""
  if not opts.size:
    raise ValueError("raw pixels need an image size")
  return np.asarray(_resized_rgb(_load(data, opts), opts), np.uint8).tobytes()


def to_stored(data: bytes, opts: JpegOptions) -> bytes:
  """An image file's bytes -> what a dataset converted with `opts` stores for it.

  The one way an image file becomes what the input pipeline decodes
  (`pipeline.decode_stored`): the converter stores its output, and prediction passes
  a file through it too (with the dataset's options, `dataset_options`), so that
  16-bit, palette or transparent images reach the model exactly as the training
  posters did.
  """
  return (to_raw if opts.raw else to_jpeg)(data, opts)


def convert_image(candidates: Sequence[str], opts: JpegOptions) -> tuple[bytes | None, str, str]:
  """The first existing path of `candidates` -> (jpeg, '', '') or (None, reason, detail).

  Never raises on bad input: whatever an image does, its row is skipped, not the run.
  """
  path = next((p for p in candidates if os.path.exists(p)), None)
  if path is None:
    others = ", ".join(Path(p).suffix for p in candidates[1:])
    return None, "missing_image", f"{candidates[0]} not found" + (
        f" (nor with {others})" if others else "")
  try:
    data = Path(path).read_bytes()
  except OSError as e:
    return None, "unreadable_image", f"{path}: {e.strerror or e}"
  if not data:
    return None, "empty_image", f"{path} is empty (0 bytes)"
  try:
    return to_stored(data, opts), "", ""
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    return None, "decompression_bomb", f"{path}: {e}"
  except UnidentifiedImageError:
    return None, "corrupt_image", f"{path}: not an image format PIL can read"
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
    return None, "corrupt_image", f"{path}: {type(e).__name__}: {e}"


def _convert_chunk(opts: JpegOptions, chunk: list[Sequence[str]]) -> list[tuple]:
  return [convert_image(c, opts) for c in chunk]


def _init_worker() -> None:
  # Ctrl-C reaches the whole process group; the parent alone handles it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  workers.exit_with_parent()


def converted_images(tasks: Iterable[Sequence[str]], num_tasks: int, opts: JpegOptions,
                     num_workers: int) -> Iterator[tuple[bytes | None, str, str]]:
  """convert_image over `tasks` (lists of candidate paths), results in task order.

  With workers, at most 2 chunks per worker are in flight and tasks are drawn as
  needed, so memory stays bounded however many posters and however fast workers run
  ahead of the writer. `spawn` rather than fork: the calling process may hold threads
  (JAX, grain) that fork would copy mid-lock.
  """
  if num_workers == 0:
    yield from (convert_image(t, opts) for t in tasks)
    return
  tasks = iter(tasks)
  chunks = iter(lambda: list(itertools.islice(tasks, _CHUNK)), [])
  num_workers = max(1, min(num_workers, math.ceil(num_tasks / _CHUNK)))
  pool = futures.ProcessPoolExecutor(num_workers, multiprocessing.get_context("spawn"),
                                     initializer=_init_worker)

  def results(chunk, future):
    try:
      return future.result()
    except BrokenProcessPool:
      raise csv_rows.ConversionError(
          f"a worker process died converting {chunk[0][0]} ... {chunk[-1][0]}; rerun "
          "with --num_workers=0 to find the image") from None

  try:
    pending = collections.deque()
    for chunk in chunks:
      # submit() starts the workers: an interrupt while it writes a worker's start-up
      # data would leave that worker printing a traceback as it dies.
      with interrupts.deferred_interrupts():
        pending.append((chunk, pool.submit(_convert_chunk, opts, chunk)))
      if len(pending) > 2 * num_workers:
        yield from results(*pending.popleft())
    while pending:
      yield from results(*pending.popleft())
    pool.shutdown(wait=True)
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
