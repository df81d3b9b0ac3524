"""Reads the tensors of a PyTorch `.pth` file into numpy, without PyTorch.

A `.pth` is a pickle whose tensors point at raw storages by persistent id, in one of
two layouts (torch/serialization.py):

  zip (torch >= 1.6): `<root>/data.pkl` plus one zip member `<root>/data/<key>` of raw
      little-endian bytes per storage;
  legacy: one file of five pickles in a row (magic number, protocol version, system
      info, the object, the list of storage keys), then per key an int64 element count
      and the raw bytes.

Both rebuild tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`. A restricted unpickler maps that and the storage types onto numpy and
refuses every other global, so loading a file runs no code from it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype (what torch.save writes for each tensor dtype).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class PthError(ValueError):
  """The file is not a readable PyTorch tensor file."""


class _Storage:
  """A storage named in the pickle; its bytes are filled in once they are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = np.dtype(dtype), numel
    self.array: np.ndarray | None = None


class _TensorRef:
  """A tensor as the pickle describes it; `resolve()` once its storage is read."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def resolve(self) -> np.ndarray:
    flat = self.storage.array
    if not self.size:
      return flat[self.offset].copy()
    needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if min(self.size) > 0 and needed > flat.size:
      raise PthError(f"a tensor of size {self.size} reaches past its storage of {flat.size}")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.size, [s * flat.itemsize for s in self.stride], writeable=False)
    return np.array(view)


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, storages: dict[str, _Storage], path: str):
    super().__init__(file)
    self._storages, self._path = storages, path

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    raise PthError(f"{self._path}: refusing to load {module}.{name}; only tensors, "
                   "state dicts and their containers can be read")

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel)
    # legacy: ('storage', type, key, location, numel, view_metadata)
    if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
      raise PthError(f"{self._path}: unsupported persistent id {pid!r:.80}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if len(pid) > 5 and pid[5] is not None:
      raise PthError(f"{self._path}: storage views (legacy PyTorch < 0.4 files) are unsupported")
    if not isinstance(storage_type, _StorageType):
      raise PthError(f"{self._path}: unsupported storage type {storage_type!r}")
    if key not in self._storages:
      self._storages[key] = _Storage(storage_type.dtype, numel)
    return self._storages[key]


def _resolve(obj: Any) -> Any:
  if isinstance(obj, _TensorRef):
    return obj.resolve()
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


def _from_bytes(buffer: bytes, storage: _Storage, what: str) -> np.ndarray:
  if len(buffer) != storage.numel * storage.dtype.itemsize:
    raise PthError(f"{what}: {len(buffer)} bytes for {storage.numel} elements of "
                   f"{storage.dtype.name}")
  return np.frombuffer(buffer, storage.dtype.newbyteorder("<"))


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise PthError(f"{path}: a zip without exactly one data.pkl; not a PyTorch file")
    root = pickles[0][:-len("data.pkl")]
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(z.read(pickles[0])), storages, path).load()
    for key, storage in storages.items():
      member = f"{root}data/{key}"
      if member not in names:
        raise PthError(f"{path}: storage {member} is missing")
      storage.array = _from_bytes(z.read(member), storage, f"{path}:{member}")
  return obj


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
    except Exception as e:
      raise PthError(f"{path}: not a PyTorch file ({e})") from None
    if magic != _LEGACY_MAGIC:
      raise PthError(f"{path}: not a PyTorch file (bad magic number)")
    if (version := pickle.load(f)) != _LEGACY_PROTOCOL:
      raise PthError(f"{path}: unsupported legacy protocol version {version}")
    info = pickle.load(f)
    if not info.get("little_endian", True):
      raise PthError(f"{path}: written on a big-endian machine; unsupported")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages, path).load()
    keys = pickle.load(f)
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise PthError(f"{path}: storage {key} is listed but no tensor uses it")
      header = f.read(8)
      if len(header) != 8:
        raise PthError(f"{path}: truncated at storage {key}")
      (numel,) = struct.unpack("<q", header)
      if numel != storage.numel:
        raise PthError(f"{path}: storage {key} holds {numel} elements, not {storage.numel}")
      nbytes = numel * storage.dtype.itemsize
      storage.array = _from_bytes(f.read(nbytes), storage, f"{path}: storage {key}")
  missing = [k for k, s in storages.items() if s.array is None]
  if missing:
    raise PthError(f"{path}: storages {missing} are never written")
  return obj


def load(path: str | os.PathLike) -> Any:
  """The object saved in a `.pth` file, every tensor a numpy array (C order, its dtype).

  Raises PthError for a file that is not a PyTorch tensor file, or one that pickles
  anything beyond tensors, dicts, lists and tuples.
  """
  path = os.fspath(path)
  try:
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, struct.error) as e:
    raise PthError(f"{path}: unreadable PyTorch file ({e})") from None
  return _resolve(obj)
