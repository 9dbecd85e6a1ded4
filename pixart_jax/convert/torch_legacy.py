"""Safe, lazy reader of the legacy (pre-1.6, non-zip) `torch.save` format. No torch import.

Some widely used weights predate the zip format, e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(released May 2019). The legacy file is a sequence of pickles followed by raw storage bytes
(torch/serialization.py `_legacy_save` / `_legacy_load`):

  pickle(MAGIC_NUMBER)  pickle(1001)  pickle(sys_info)  pickle(obj)  pickle(sorted storage keys)
  then for each key in that order: int64 element count, then count * itemsize bytes (little endian)

`obj` is unpickled by the same restricted unpickler as the zip format (`torch_pickle._SafeUnpickler`: a
whitelist of inert stand-ins, nothing from the file is called or imported); its persistent ids are the
6-tuples `('storage', StorageType, key, location, numel, view_metadata)`. The other pickles may hold plain
data only. Storage views (`view_metadata`, written only for tensors sharing a storage at an offset by very
old torch versions) and whole pickled modules are refused with `TorchFormatError`.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from pixart_jax.convert.torch_pickle import (_LEGACY_MAGIC, TorchFormatError, TorchZipArchive, _Marker,
                                             _NoGlobalsUnpickler, _SafeUnpickler, _StorageRef)

__all__ = ["TorchLegacyArchive"]

_PROTOCOL_VERSION = 1001  # torch.serialization.PROTOCOL_VERSION


class _LegacyUnpickler(_SafeUnpickler):
  """The safe unpickler with the legacy persistent-id layout."""

  def persistent_load(self, pid):
    path = self._archive.path
    if isinstance(pid, tuple) and pid and pid[0] == "module":
      raise TorchFormatError(f"{path}: the file pickles a whole nn.Module, not a state dict; only tensors "
                             "and containers can be read safely")
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise TorchFormatError(f"{path}: unsupported persistent id {pid!r:.200}")
    _, storage_type, key, _location, numel, view = pid
    if not isinstance(storage_type, _Marker) or storage_type.kind != "storage":
      raise TorchFormatError(f"{path}: bad storage type {storage_type!r}")
    if storage_type.dtype is None:
      raise TorchFormatError(f"{path}: quantized storages ({storage_type.name}) are not supported")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise TorchFormatError(f"{path}: bad storage record {pid!r:.200}")
    if view is not None:
      raise TorchFormatError(f"{path}: storage views (view_metadata {view!r:.100}) are not supported; re-save "
                             "the state dict with torch>=1.6")
    return self._archive.storage(key, storage_type.dtype, numel)


class TorchLegacyArchive(TorchZipArchive):
  """An open legacy torch file; same interface as `TorchZipArchive` (`obj` with `TorchTensorRef` leaves).

  Storages are located by walking the size headers after the pickles (8 bytes each, no data read), so
  `TorchTensorRef.numpy()` reads just one tensor's bytes with positioned reads.
  """

  def __init__(self, path):  # noqa: super().__init__ is the zip parser; only the readers are shared
    self.path = os.fspath(path)
    self._fd = -1
    self.file_size = os.stat(self.path).st_size
    self._swap = False  # _legacy_save writes storage bytes little endian
    self._storages: dict[str, _StorageRef] = {}
    self._offsets: dict[str, int] = {}
    try:
      with open(self.path, "rb") as f:
        if _plain(f, self.path, "magic number") != _LEGACY_MAGIC:
          raise TorchFormatError(f"{self.path} is not a legacy torch file (bad magic number)")
        version = _plain(f, self.path, "protocol version")
        if version != _PROTOCOL_VERSION:
          raise TorchFormatError(f"{self.path}: legacy protocol version {version!r} is not supported "
                                 f"(only {_PROTOCOL_VERSION})")
        info = _plain(f, self.path, "sys_info")
        if isinstance(info, dict) and info.get("little_endian") is False:
          raise TorchFormatError(f"{self.path} was written on a big-endian machine; not supported")
        self.obj = _LegacyUnpickler(f, self).load()
        keys = _plain(f, self.path, "storage key list")
        start = f.tell()
      if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchFormatError(f"{self.path}: corrupt storage key list")
      self._fd = os.open(self.path, os.O_RDONLY)
      self._locate(keys, start, os.fstat(self._fd).st_size)
    except BaseException:
      self.close()
      raise

  def _locate(self, keys: list[str], pos: int, size: int) -> None:
    unknown = sorted(set(keys) - set(self._storages))
    unlisted = sorted(set(self._storages) - set(keys))
    if unknown or unlisted:
      raise TorchFormatError(f"{self.path}: storage keys do not match the pickle (listed only: {unknown[:10]}, "
                             f"referenced only: {unlisted[:10]})")
    for key in keys:
      ref = self._storages[key]
      head = os.pread(self._fd, 8, pos)
      if len(head) != 8:
        raise TorchFormatError(f"{self.path} is truncated: no size header for storage {key!r} at byte {pos}")
      (numel,) = struct.unpack("<q", head)
      if numel != ref.numel:
        raise TorchFormatError(f"{self.path}: storage {key!r} holds {numel} elements, the pickle expects "
                               f"{ref.numel}")
      self._offsets[key] = pos + 8
      pos += 8 + ref.nbytes
      if pos > size:
        raise TorchFormatError(f"{self.path} is truncated: storage {key!r} ends at byte {pos}, the file has "
                               f"{size}")

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _StorageRef:
    ref = self._storages.get(key)
    if ref is None:
      ref = self._storages[key] = _StorageRef(self, key, dtype, numel)
      if ref.nbytes > self.file_size:
        raise TorchFormatError(f"{self.path}: storage {key!r} declares {numel} elements ({ref.nbytes} bytes), more "
                               f"than the whole file ({self.file_size} bytes)")
    elif ref.dtype != np.dtype(dtype) or ref.numel != numel:
      raise TorchFormatError(f"{self.path}: storage {key!r} is referenced as both {ref.dtype}[{ref.numel}] "
                             f"and {np.dtype(dtype)}[{numel}]")
    return ref

  def _read_into(self, member: str, start: int, out: np.ndarray) -> None:
    """Fills the uint8 array `out` with bytes [start, start + out.size) of storage `member`."""
    pos, view, done = self._offsets[member] + start, memoryview(out), 0
    while done < out.size:
      n = os.preadv(self._fd, [view[done:]], pos + done)
      if n <= 0:
        raise TorchFormatError(f"{self.path}: unexpected end of file while reading storage {member!r}")
      done += n

  def close(self) -> None:
    if getattr(self, "_fd", -1) >= 0:
      os.close(self._fd)
      self._fd = -1


def _plain(f, path: str, what: str):
  """One pickle of plain data (no globals) from the open file `f`."""
  try:
    return _NoGlobalsUnpickler(f).load()
  except Exception as e:  # noqa: BLE001 - one clear error naming the file and the part
    raise TorchFormatError(f"{path}: cannot read the legacy {what}: {type(e).__name__}: {e}") from None
