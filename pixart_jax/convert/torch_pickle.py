"""Safe, lazy reader of the PyTorch zip checkpoint format (`torch.save`, torch >= 1.6). No torch import.

A `.pth` written by `torch.save` is a zip archive `<name>/data.pkl` (the pickled object) plus one member
`<name>/data/<key>` per storage, stored uncompressed. Unpickling normally runs arbitrary code; here a
restricted `pickle.Unpickler` resolves only a whitelist of globals (tensor rebuild functions, storage and
dtype names, `collections.OrderedDict`, a few builtins) to inert stand-ins, and refuses everything else with
`UnsafePickleError` naming `module.qualname`. Nothing from the file is ever called or imported.

Tensors come back as `TorchTensorRef` records (storage member, byte offset, shape, strides, dtype);
`TorchTensorRef.numpy()` reads just that tensor's bytes from the archive with `os.preadv` straight into a
fresh numpy array (strided views are read as their byte span, then `as_strided` + copy).
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["empty_aligned", "UnsafePickleError", "TorchFormatError", "TorchTensorRef", "TorchZipArchive",
           "is_legacy_torch_file"]


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global outside the whitelist (it could run code); nothing was executed."""


class TorchFormatError(ValueError):
  """The file is not a readable torch zip checkpoint (legacy format, corrupt, unsupported tensor kind)."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128, "ComplexFloatStorage": np.complex64,
    "UntypedStorage": np.uint8,
}
_QUANTIZED_STORAGES = ("QInt8Storage", "QInt32Storage", "QUInt8Storage", "QUInt4x2Storage", "QUInt2x4Storage")
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
_TORCH_DTYPES_UNSUPPORTED = ("qint8", "qint32", "quint8", "quint4x2", "quint2x4", "complex32", "chalf")


class _Inert:
  """Base of the stand-ins the unpickler hands out: immutable, and BUILD on them is refused."""
  __slots__ = ()

  def __setattr__(self, name, value):
    raise UnsafePickleError(f"pickle tried to set attribute {name!r} on a {type(self).__name__}")

  def __setstate__(self, state):
    raise UnsafePickleError(f"pickle tried to BUILD a {type(self).__name__}")


class _Marker(_Inert):
  """A named inert stand-in for a whitelisted global (storage class, torch dtype, Tensor class ...)."""
  __slots__ = ("kind", "name", "dtype")

  def __init__(self, kind: str, name: str, dtype=None):
    object.__setattr__(self, "kind", kind)
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", None if dtype is None else np.dtype(dtype))

  def __repr__(self):
    return f"<{self.kind} {self.name}>"


class _StorageRef(_Inert):
  """One storage: zip member `member`, `numel` elements of `dtype`."""
  __slots__ = ("archive", "member", "dtype", "numel")

  def __init__(self, archive, member, dtype, numel):
    for k, v in zip(self.__slots__, (archive, member, np.dtype(dtype), int(numel))):
      object.__setattr__(self, k, v)

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


class TorchTensorRef(_Inert):
  """A tensor inside a torch zip archive, not yet read. `strides` are in elements, as in torch."""
  __slots__ = ("storage", "byte_offset", "shape", "strides", "dtype")

  def __init__(self, storage: _StorageRef, byte_offset: int, shape, strides, dtype):
    for k, v in zip(self.__slots__, (storage, int(byte_offset), tuple(shape), tuple(strides), np.dtype(dtype))):
      object.__setattr__(self, k, v)

  def __repr__(self):
    return f"TorchTensorRef(shape={self.shape}, dtype={self.dtype}, member={self.storage.member!r})"

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize  # python ints: a hostile shape cannot overflow to 0

  def numpy(self) -> np.ndarray:
    """Reads this tensor (only its bytes) into a new C-contiguous numpy array of its native dtype."""
    return self.storage.archive.read_tensor(self)


def _check_ints(name, values):
  if not isinstance(values, tuple) or not all(isinstance(v, int) and v >= 0 for v in values):
    raise TorchFormatError(f"corrupt tensor record: {name} must be a tuple of non-negative ints, got {values!r}")
  return values


def _rebuild(storage, storage_offset, size, stride, dtype=None):
  if not isinstance(storage, _StorageRef):
    raise TorchFormatError(f"corrupt tensor record: expected a storage, got {type(storage).__name__}")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise TorchFormatError(f"corrupt tensor record: bad storage offset {storage_offset!r}")
  size, stride = _check_ints("size", tuple(size)), _check_ints("stride", tuple(stride))
  if len(size) != len(stride):
    raise TorchFormatError(f"corrupt tensor record: size {size} and stride {stride} differ in rank")
  dtype = storage.dtype if dtype is None else dtype
  ref = TorchTensorRef(storage, storage_offset * dtype.itemsize, size, stride, dtype)
  if 0 not in size:  # the last element addressed must lie inside the storage
    end = ref.byte_offset + (1 + sum((n - 1) * s for n, s in zip(size, stride))) * dtype.itemsize
    if end > storage.nbytes:
      raise TorchFormatError(f"corrupt tensor record: view of {storage.member!r} ends at byte {end}, "
                             f"past the storage's {storage.nbytes} bytes")
  limit = max(storage.nbytes, storage.archive.file_size)
  if ref.nbytes > limit:
    raise TorchFormatError(f"{storage.archive.path}: tensor of shape {list(size)} {dtype} would take {ref.nbytes} bytes "
                           f"but its storage {storage.member!r} holds {storage.nbytes} and the file {storage.archive.file_size} "
                           f"(stride {list(stride)}); refusing to allocate it")
  return ref


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  if not isinstance(dtype, _Marker) or dtype.kind != "dtype":
    raise TorchFormatError(f"corrupt tensor record: expected a torch dtype, got {dtype!r}")
  if dtype.dtype is None:
    raise TorchFormatError(f"tensors of dtype torch.{dtype.name} are not supported")
  return _rebuild(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  if not isinstance(data, TorchTensorRef):
    raise TorchFormatError(f"corrupt parameter record: expected a tensor, got {type(data).__name__}")
  return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
  if func not in _REBUILDERS or not isinstance(new_type, _Marker) or new_type.kind != "tensor_class":
    raise UnsafePickleError(f"torch._tensor._rebuild_from_type_v2 with unsupported arguments {func!r}, {new_type!r}")
  return func(*args)  # python attributes (`state`) of tensor subclasses are dropped


def _codecs_encode(text, encoding="utf-8"):
  if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii") or not isinstance(text, str):
    raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return text.encode(encoding)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafePickleError("numpy scalar with an object dtype or non-bytes payload is not allowed")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _bytearray(source=b"", encoding=None, errors=None):
  """`bytearray` from bytes / text only: `bytearray(n)` would allocate n bytes the file does not hold."""
  if not isinstance(source, (bytes, bytearray, str)):
    raise TorchFormatError(f"pickle calls bytearray({type(source).__name__}); only bytes or text are allowed (a size "
                           "would allocate memory the file does not hold)")
  if isinstance(source, str):
    return bytearray(source, encoding or "utf-8", errors or "strict")
  return bytearray(source)


def _torch_size(dims=()):
  return tuple(dims)


def _torch_device(*args):
  return ":".join(str(a) for a in args)


def _get_layout(name):
  return str(name)


def _allowed_globals() -> dict[str, Any]:
  rc: dict[str, Any] = {
      "collections.OrderedDict": collections.OrderedDict,
      "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
      "builtins.bytearray": _bytearray, "builtins.slice": slice,
      "_codecs.encode": _codecs_encode,
      "torch._utils._rebuild_tensor": _rebuild_tensor,
      "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
      "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
      "torch._utils._rebuild_parameter": _rebuild_parameter,
      "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
      "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
      "torch.serialization._get_layout": _get_layout,
      "torch.Size": _torch_size, "torch.device": _torch_device,
      "torch.Tensor": _Marker("tensor_class", "Tensor"),
      "torch.nn.parameter.Parameter": _Marker("tensor_class", "Parameter"),
      "numpy.dtype": np.dtype,
      "numpy.core.multiarray.scalar": _numpy_scalar, "numpy._core.multiarray.scalar": _numpy_scalar,
  }
  for name, dt in _STORAGE_DTYPES.items():
    rc[f"torch.{name}"] = rc[f"torch.storage.{name}"] = _Marker("storage", name, dt)
  for name in _QUANTIZED_STORAGES:
    rc[f"torch.{name}"] = _Marker("storage", name)
  for name, dt in _TORCH_DTYPES.items():
    rc[f"torch.{name}"] = _Marker("dtype", name, dt)
  for name in _TORCH_DTYPES_UNSUPPORTED:
    rc[f"torch.{name}"] = _Marker("dtype", name)
  for name in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format", "strided"):
    rc[f"torch.{name}"] = _Marker("torch_constant", name)
  return rc


_ALLOWED = _allowed_globals()


class _SafeUnpickler(pickle.Unpickler):

  def __init__(self, file, archive: "TorchZipArchive"):
    super().__init__(file, encoding="utf-8")
    self._archive = archive

  def find_class(self, module, name):
    if module == "__builtin__":  # protocol-2 pickles name builtins the python-2 way
      module = "builtins"
    qualname = f"{module}.{name}"
    if qualname in _ALLOWED:
      return _ALLOWED[qualname]
    raise UnsafePickleError(
        f"{self._archive.path}: the pickle references {qualname!r}, which is not an allowed tensor/container "
        "type; refusing to load it (it could execute code). Nothing was executed.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise TorchFormatError(f"{self._archive.path}: unsupported persistent id {pid!r:.200}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _Marker) or storage_type.kind != "storage":
      raise TorchFormatError(f"{self._archive.path}: bad storage type {storage_type!r}")
    if storage_type.dtype is None:
      raise TorchFormatError(f"{self._archive.path}: quantized storages ({storage_type.name}) are not supported")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise TorchFormatError(f"{self._archive.path}: bad storage record {pid!r:.200}")
    return self._archive.storage(key, storage_type.dtype, numel)


ALIGNMENT = 64  # XLA:CPU adopts 64-byte aligned host buffers without a copy (`jax.device_put` aliases them)


def empty_aligned(shape, dtype) -> np.ndarray:
  """`np.empty(shape, dtype)` whose data starts on a 64-byte boundary, so a CPU `jax.device_put` of it is
  zero-copy (the jax.Array then owns that memory: never write to the numpy array afterwards)."""
  dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  start = (-raw.ctypes.data) % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Reads plain data only (used to sniff the legacy magic number); every global is refused."""

  def find_class(self, module, name):
    raise UnsafePickleError(f"{module}.{name}")


def is_legacy_torch_file(path) -> bool:
  """True for a pre-1.6 (non-zip) torch file: a pickle stream starting with torch's magic number."""
  with open(path, "rb") as f:
    head = f.read(64)
  if not head.startswith(b"\x80"):
    return False
  try:
    return _NoGlobalsUnpickler(io.BytesIO(head)).load() == _LEGACY_MAGIC
  except Exception:  # noqa: BLE001 - any parse failure means "not that format"
    return False


class TorchZipArchive:
  """An open torch zip checkpoint. `obj` is the unpickled object with `TorchTensorRef` leaves."""

  def __init__(self, path):
    self.path = os.fspath(path)
    if not zipfile.is_zipfile(self.path):
      if is_legacy_torch_file(self.path):
        raise TorchFormatError(
            f"{self.path} uses the legacy (pre-1.6, non-zip) torch format, which cannot be read safely "
            "without torch. Re-save it with torch>=1.6: torch.save(torch.load(path), new_path).")
      raise TorchFormatError(f"{self.path} is not a torch zip checkpoint (no zip archive found)")
    self._fd = -1
    self.file_size = os.stat(self.path).st_size
    self._zip = zipfile.ZipFile(self.path)
    try:
      names = self._zip.namelist()
      pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or \
            [n for n in names if n == "data.pkl"]
      if len(pkl) != 1:
        raise TorchFormatError(f"{self.path}: expected one '<archive>/data.pkl' member, found {pkl or 'none'}")
      self._prefix = pkl[0][: -len("data.pkl")]
      self._infos = {i.filename: i for i in self._zip.infolist()}
      self._offsets: dict[str, int] = {}
      self._storages: dict[str, _StorageRef] = {}
      order = self._zip.read(self._prefix + "byteorder") if self._prefix + "byteorder" in self._infos else b"little"
      if order not in (b"little", b"big"):
        raise TorchFormatError(f"{self.path}: unknown byte order {order!r}")
      self._swap = order.decode() != sys.byteorder
      self._fd = os.open(self.path, os.O_RDONLY)
      with self._zip.open(pkl[0]) as f:
        self.obj = _SafeUnpickler(f, self).load()
    except BaseException:
      self.close()
      raise

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _StorageRef:
    member = f"{self._prefix}data/{key}"
    if member not in self._infos:
      raise TorchFormatError(f"{self.path}: storage member {member!r} is missing from the archive")
    ref = self._storages.get(member)
    if ref is None:
      info = self._infos[member]
      stored = info.compress_type == zipfile.ZIP_STORED
      if (stored and info.compress_size != info.file_size) or info.header_offset + info.compress_size > self.file_size:
        raise TorchFormatError(f"{self.path}: zip member {member!r} claims {info.file_size} bytes "
                               f"({info.compress_size} stored at byte {info.header_offset}) but the file has "
                               f"{self.file_size}")
      ref = self._storages[member] = _StorageRef(self, member, dtype, numel)
      if stored and ref.nbytes > self.file_size:
        raise TorchFormatError(f"{self.path}: storage {member!r} declares {numel} elements ({ref.nbytes} bytes), "
                               f"more than the whole file ({self.file_size} bytes)")
      if info.file_size < ref.nbytes:
        raise TorchFormatError(f"{self.path}: storage {member!r} holds {self._infos[member].file_size} bytes, "
                               f"the pickle expects {ref.nbytes}")
    return ref

  def _data_offset(self, member: str) -> int:
    if member not in self._offsets:
      info = self._infos[member]
      if info.flag_bits & 0x1:
        raise TorchFormatError(f"{self.path}: member {member!r} is encrypted")
      header = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
      sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
      if sig != b"PK\x03\x04":
        raise TorchFormatError(f"{self.path}: bad zip local header for {member!r}")
      self._offsets[member] = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return self._offsets[member]

  def _read_into(self, member: str, start: int, out: np.ndarray) -> None:
    """Fills the uint8 array `out` with bytes [start, start + out.size) of `member`."""
    info = self._infos[member]
    if info.compress_type != zipfile.ZIP_STORED:  # unusual (re-zipped by another tool): decompress
      with self._zip.open(member) as f:
        f.seek(start)
        out[:] = np.frombuffer(f.read(out.size), np.uint8)
      return
    pos, view, done = self._data_offset(member) + start, memoryview(out), 0
    while done < out.size:
      n = os.preadv(self._fd, [view[done:]], pos + done)
      if n <= 0:
        raise TorchFormatError(f"{self.path}: unexpected end of file while reading {member!r}")
      done += n

  def read_tensor(self, t: TorchTensorRef) -> np.ndarray:
    if self._fd < 0:
      raise ValueError(f"{self.path}: archive is closed")
    shape, dtype, item = t.shape, t.dtype, t.dtype.itemsize
    numel = int(np.prod(shape, dtype=np.int64))
    out = empty_aligned(shape, dtype)
    if numel == 0:
      return out
    c_strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
    if all(n == 1 or s == c for n, s, c in zip(shape, t.strides, c_strides)):
      self._read_into(t.storage.member, t.byte_offset, out.reshape(-1).view(np.uint8))
      self._fix_order(out)
      return out
    span = 1 + sum((n - 1) * s for n, s in zip(shape, t.strides))
    buf = np.empty(span, dtype)
    self._read_into(t.storage.member, t.byte_offset, buf.view(np.uint8))
    self._fix_order(buf)
    out[...] = np.lib.stride_tricks.as_strided(buf, shape, tuple(s * item for s in t.strides), writeable=False)
    return out

  def _fix_order(self, a: np.ndarray) -> None:
    if self._swap and a.dtype.itemsize > 1:
      flat = a.reshape(-1)
      if a.dtype.kind == "c":
        flat = flat.view(np.dtype(f"f{a.dtype.itemsize // 2}"))
      flat.view(np.dtype(f"u{flat.dtype.itemsize}")).byteswap(inplace=True)

  def close(self) -> None:
    if getattr(self, "_fd", -1) >= 0:
      os.close(self._fd)
      self._fd = -1
    self._zip.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
