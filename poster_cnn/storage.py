"""Local and object-storage paths (gs://, s3://) as one path type: `etils.epath.Path`.

epath is what orbax already uses for checkpoint metadata; its gs:// and s3://
backends are fsspec's gcsfs and s3fs, optional extras here (`poster_cnn[gcs]`,
`poster_cnn[s3]`). `path()` checks a remote path's package before anything is
read or written, so a missing one is a one-line error naming the extra.

What object storage lacks, and what we do instead:
  rename    a single PUT is atomic (the object appears whole or not at all), so
            `atomic_write_bytes` writes remote files directly and keeps the
            temporary file + rename for local disks only.
  append    `Staging` keeps files that grow (metrics.jsonl, TensorBoard events)
            in a local folder and uploads them whole, now and then and at close.
  pread     `read_range` is one ranged GET through the same fsspec file system
            epath uses (epath has no ranged read).

Endpoints come from the clients' own environment variables: STORAGE_EMULATOR_HOST
(gcsfs) and TENSORSTORE_GCS_HTTP_URL (orbax's array writes) for GCS,
AWS_ENDPOINT_URL for S3 (botocore), with the usual credentials.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import uuid

from etils import epath

# scheme -> (package, pip extra, fsspec protocol)
_BACKENDS = {"gs": ("gcsfs", "gcs", "gcs"), "s3": ("s3fs", "s3", "s3")}


class StorageError(ValueError):
  """A path this installation cannot use (unknown scheme, or its package is missing)."""


def scheme(path: epath.PathLike) -> str | None:
  """'gs', 's3', ... for a URL, None for a local path."""
  text = os.fspath(path)
  return text.split("://", 1)[0] if "://" in text else None


def is_remote(path: epath.PathLike) -> bool:
  return scheme(path) is not None


def check(path: epath.PathLike) -> None:
  """Raises StorageError, in one line, when `path` is remote and cannot be used here."""
  name = scheme(path)
  if name is None:
    return
  if name not in _BACKENDS:
    raise StorageError(f"{os.fspath(path)}: {name}:// is not supported; use a local path, "
                       "gs:// or s3://")
  package, extra, _ = _BACKENDS[name]
  if importlib.util.find_spec(package) is None:
    raise StorageError(f"{os.fspath(path)}: {name}:// paths need {package}: "
                       f"pip install 'poster_cnn[{extra}]'")
  if name == "gs" and os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs (2026.10) otherwise probes every bucket's type over gRPC, which an emulator
    # never answers: each call waits 60 s. Read when gcsfs is first imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def path(p: epath.PathLike) -> epath.Path:
  """`p` as an epath.Path: local paths made absolute (orbax needs that), URLs checked."""
  check(p)
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def filesystem(p: epath.PathLike):
  """The fsspec file system of a remote path: the instance epath's backend uses."""
  check(p)
  import fsspec
  protocol = _BACKENDS[scheme(p)][2]
  # Same arguments as etils.epath's backend, so fsspec's instance cache shares it.
  return (fsspec.filesystem(protocol, finalize_on_close=True) if protocol == "gcs"
          else fsspec.filesystem(protocol))


def read_range(p: str, start: int, end: int) -> bytes:
  """Bytes [start, end) of a remote file: one ranged GET."""
  return filesystem(p).cat_file(p, start=start, end=end)


def size(p: epath.PathLike) -> int:
  return os.path.getsize(p) if not is_remote(p) else int(filesystem(p).size(os.fspath(p)))


def open_read(p: epath.PathLike, block_size: int = 16 << 20):
  """A binary file for reading in order: the local file, or a remote one read ahead
  `block_size` bytes per request."""
  if not is_remote(p):
    return open(p, "rb")
  return filesystem(p).open(os.fspath(p), "rb", block_size=block_size,
                            cache_type="readahead")


def atomic_write_bytes(p: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `p` whole or not at all.

  Local: a temporary file in the same folder and a rename. Remote: one upload,
  which object storage makes visible only once complete.
  """
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  tmp.replace(p)


def upload_tree(local: str | os.PathLike, remote: epath.PathLike) -> None:
  """Copies every file under the local folder `local` to the same place under `remote`."""
  fs = filesystem(remote)
  for root, _, files in os.walk(local):
    for name in files:
      source = os.path.join(root, name)
      target = os.fspath(epath.Path(remote) / os.path.relpath(source, local))
      fs.put_file(source, target)


class Staging:
  """A local folder standing in for `target`, for files written piece by piece.

  Local targets are used directly. For remote ones, `local` is a temporary folder
  primed with `prime` (files to extend, copied down if they exist); `sync()`
  uploads its files whole (`sync_due()` once `interval` seconds have passed), and
  `close()` uploads a last time and removes the folder. A killed process loses
  at most the last `interval` seconds of what it wrote.
  """

  def __init__(self, target: epath.PathLike, *, prime: tuple[str, ...] = (),
               interval: float = 30.0):
    self.target = path(target)
    self.remote = is_remote(self.target)
    self.interval = interval
    self._synced = time.monotonic()
    if not self.remote:
      self.target.mkdir(parents=True, exist_ok=True)
      self.local = os.fspath(self.target)
      return
    self.local = tempfile.mkdtemp(prefix="poster_cnn-staging-")
    for name in prime:
      if (self.target / name).exists():
        filesystem(self.target).get_file(os.fspath(self.target / name),
                                         os.path.join(self.local, name))

  def sync_due(self) -> bool:
    return self.remote and time.monotonic() - self._synced >= self.interval

  def sync(self) -> None:
    if not self.remote:
      return
    upload_tree(self.local, self.target)
    self._synced = time.monotonic()

  def close(self) -> None:
    if self.remote and os.path.isdir(self.local):
      try:
        self.sync()
      finally:
        shutil.rmtree(self.local, ignore_errors=True)
