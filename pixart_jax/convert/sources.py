"""Lazy read-only tensor sources: safetensors (single / sharded), torch `.pth` (zip or legacy), in-memory dicts.

    with open_tensors("PixArt-Sigma-XL-2-1024-MS.pth") as src:      # or a .safetensors / index json / dir
      for key in src.keys():
        src.shape(key), src.dtype(key)   # from headers only
        w = src.get(key)                 # reads ONE tensor: native dtype, C-contiguous numpy array

Nothing is read until `get`. Files are read with positioned reads into fresh 64-byte aligned numpy arrays
(no mmap), so a tensor's memory is released as soon as the caller drops it, and on the CPU backend
`jax.device_put` adopts it without a copy. bf16 / fp8 use `ml_dtypes` dtypes.
"""
from __future__ import annotations

import abc
import json
import math
import os
import pathlib
import struct
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from pixart_jax.convert.torch_legacy import TorchLegacyArchive
from pixart_jax.convert.torch_pickle import (_TORCH_DTYPES, TorchTensorRef, TorchZipArchive, empty_aligned,
                                             is_legacy_torch_file)

__all__ = ["empty_aligned", "TensorSource", "DictSource", "SafetensorsSource", "TorchSource", "ShardedSource",
           "open_tensors", "SAFETENSORS_DTYPES", "TORCH_SUFFIXES"]

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "C64": np.dtype(np.complex64),
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_MAX_HEADER = 100 * 2**20


class TensorSource(abc.ABC):
  """A lazy read-only mapping from tensor names to numpy arrays (abstract: subclasses implement the four readers)."""

  name: str = "<tensors>"

  @abc.abstractmethod
  def keys(self) -> list[str]:
    """Every tensor name."""

  @abc.abstractmethod
  def shape(self, key: str) -> tuple[int, ...]:
    """The tensor's shape, without reading it."""

  @abc.abstractmethod
  def dtype(self, key: str) -> np.dtype:
    """The tensor's numpy dtype (bf16 as ml_dtypes.bfloat16), without reading it."""

  @abc.abstractmethod
  def get(self, key: str) -> np.ndarray:
    """Reads one tensor into a NEW C-contiguous array (64-byte aligned) that the caller owns."""

  def nbytes(self, key: str) -> int:
    return int(np.prod(self.shape(key), dtype=np.int64)) * self.dtype(key).itemsize

  def close(self) -> None:
    pass

  def _missing(self, key) -> KeyError:
    return KeyError(f"{key!r} is not a tensor of {self.name}")

  def __contains__(self, key) -> bool:
    return key in set(self.keys())

  def __len__(self) -> int:
    return len(self.keys())

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self):
    return f"{type(self).__name__}({self.name}, {len(self)} tensors)"


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # only reached for torch tensors handed in by the caller
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    dt = ml_dtypes.float8_e4m3fn if t.dtype == torch.float8_e4m3fn else ml_dtypes.float8_e5m2
    return t.view(torch.uint8).numpy().view(dt)
  return t.numpy()


class DictSource(TensorSource):
  """Wraps an in-memory `{key: np.ndarray | torch.Tensor}` (tests, already-loaded state dicts)."""

  def __init__(self, tensors: Mapping[str, Any], name: str = "<dict>"):
    self._t = dict(tensors)
    self.name = name
    bad = sorted(k for k, v in self._t.items() if not hasattr(v, "shape") or not hasattr(v, "dtype"))
    if bad:
      raise TypeError(f"DictSource values must be arrays or tensors; not for keys {bad}")

  def keys(self):
    return list(self._t)

  def _val(self, key):
    if key not in self._t:
      raise self._missing(key)
    return self._t[key]

  def shape(self, key):
    return tuple(int(n) for n in self._val(key).shape)

  def dtype(self, key):
    v = self._val(key)
    if type(v).__module__.startswith("torch"):
      return np.dtype(_TORCH_DTYPES[str(v.dtype).removeprefix("torch.")])
    return np.dtype(v.dtype)

  def get(self, key):
    v = self._val(key)
    v = _torch_to_numpy(v) if type(v).__module__.startswith("torch") else np.asarray(v)
    out = empty_aligned(v.shape, v.dtype)  # a copy: the caller owns what `get` returns
    out[...] = v
    return out

  def __contains__(self, key):
    return key in self._t


class SafetensorsSource(TensorSource):
  """One `.safetensors` file; the header is parsed at open, tensors are read on `get`."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.name = str(self.path)
    size = self.path.stat().st_size
    self._fd = os.open(self.path, os.O_RDONLY)
    try:
      self._parse_header(size)
    except BaseException:
      self.close()
      raise

  def _parse_header(self, size: int) -> None:
    raw = os.pread(self._fd, 8, 0)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if n <= 0 or n > _MAX_HEADER or 8 + n > size:
      raise ValueError(f"{self.path} is not a safetensors file (bad header length {n})")
    try:
      header = json.loads(os.pread(self._fd, n, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.path} is not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
      raise ValueError(f"{self.path} is not a safetensors file: the header is a JSON {type(header).__name__}, "
                       "expected an object {name: {dtype, shape, data_offsets}}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
      raise ValueError(f"{self.path}: __metadata__ is a {type(meta).__name__}, expected an object of strings")
    self.metadata: dict[str, str] = meta
    self._base, self._info = 8 + n, {}
    spans = []
    for key, info in header.items():
      code, shape, (begin, end) = _check_entry(self.path, key, info)
      dt = SAFETENSORS_DTYPES[code]
      need = math.prod(shape) * dt.itemsize  # python ints: a hostile shape cannot overflow to a match
      if end - begin != need:
        raise ValueError(f"{self.path}: tensor {key!r} ({code} {list(shape)}) has data offsets [{begin}, {end}) "
                         f"holding {end - begin} bytes; its shape and dtype need {need}")
      if self._base + end > size:
        raise ValueError(f"{self.path} is truncated: tensor {key!r} ends at byte {self._base + end}, "
                         f"the file has {size}")
      self._info[key] = (dt, shape, begin)
      spans.append((begin, end, key))
    _check_spans(self.path, sorted(spans), size - self._base)
    self._keys = sorted(self._info, key=lambda k: self._info[k][2])  # storage order: sequential reads

  def keys(self):
    return list(self._keys)

  def _entry(self, key):
    if key not in self._info:
      raise self._missing(key)
    return self._info[key]

  def shape(self, key):
    return self._entry(key)[1]

  def dtype(self, key):
    return self._entry(key)[0]

  def get(self, key):
    dt, shape, begin = self._entry(key)
    if self._fd < 0:
      raise ValueError(f"{self.path} is closed")
    out = empty_aligned(shape, dt)
    flat, pos, done = memoryview(out.reshape(-1).view(np.uint8)), self._base + begin, 0
    while done < out.nbytes:
      n = os.preadv(self._fd, [flat[done:]], pos + done)
      if n <= 0:
        raise ValueError(f"{self.path}: unexpected end of file while reading {key!r}")
      done += n
    return out

  def __contains__(self, key):
    return key in self._info

  def close(self):
    if getattr(self, "_fd", -1) >= 0:
      os.close(self._fd)
      self._fd = -1


def _check_entry(path, key, info) -> tuple[str, tuple[int, ...], tuple[int, int]]:
  """(dtype code, shape, (begin, end)) of one safetensors header entry; ValueError naming what is wrong."""
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise ValueError(f"{path}: header entry {key!r} is {info!r:.100}; expected an object with dtype, shape and "
                     "data_offsets")
  code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
    raise ValueError(f"{path}: tensor {key!r} has unsupported safetensors dtype {code!r:.40}; supported: "
                     f"{sorted(SAFETENSORS_DTYPES)}")
  if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
    raise ValueError(f"{path}: tensor {key!r} has shape {shape!r:.100}; expected a list of non-negative ints")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
      or not 0 <= offsets[0] <= offsets[1]):
    raise ValueError(f"{path}: tensor {key!r} has data_offsets {offsets!r:.100}; expected [begin, end] with "
                     "0 <= begin <= end")
  return code, tuple(shape), (offsets[0], offsets[1])


def _check_spans(path, spans: list[tuple[int, int, str]], data_size: int) -> None:
  """The tensors' byte ranges (sorted) must tile the data section exactly: no overlap, no gap."""
  pos, prev = 0, None
  for begin, end, key in spans:
    if begin < pos:
      raise ValueError(f"{path}: tensors {prev!r} and {key!r} overlap (bytes [{begin}, {pos}) of the data "
                       "section); each tensor must have its own bytes")
    if begin > pos:
      raise ValueError(f"{path}: bytes [{pos}, {begin}) of the data section belong to no tensor; the offsets "
                       "must cover the data without gaps")
    pos, prev = end, key
  if pos != data_size:
    raise ValueError(f"{path}: the tensors cover {pos} bytes of data but the file holds {data_size} after its "
                     "header; the offsets must cover the data exactly")


def _tensor_dict(d) -> dict[str, TorchTensorRef]:
  return {str(k): v for k, v in d.items() if isinstance(v, TorchTensorRef)}


def _select(obj, subkey: str | None, path: str) -> tuple[dict[str, TorchTensorRef], str]:
  """Picks the state dict inside an unpickled checkpoint (see `open_tensors`)."""
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: the checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
  holders = sorted(str(k) for k, v in obj.items() if isinstance(v, dict) and _tensor_dict(v))
  if subkey is None:
    return _tensor_dict(obj), ""
  if subkey != "auto":
    node = obj
    for part in [subkey] if subkey in obj else subkey.split("."):
      if isinstance(node, dict) and part not in node and part.isdigit() and int(part) in node:
        part = int(part)  # e.g. "optimizer.state.0"
      if not isinstance(node, dict) or part not in node:
        raise KeyError(f"{path}: no entry {subkey!r}; top-level entries holding tensors: {holders}")
      node = node[part]
    if not isinstance(node, dict):
      raise ValueError(f"{path}: entry {subkey!r} is a {type(node).__name__}, not a dict of tensors")
    return _tensor_dict(node), subkey
  if isinstance(obj.get("state_dict"), dict):
    return _tensor_dict(obj["state_dict"]), "state_dict"
  top = _tensor_dict(obj)
  if top:
    return top, ""
  if len(holders) == 1 and holders[0] in ("model", "module"):
    return _tensor_dict(obj[holders[0]]), holders[0]
  if holders:
    raise ValueError(f"{path}: several entries hold tensors {holders}; pass subkey= to choose one")
  raise ValueError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:20]})")


class TorchSource(TensorSource):
  """A `torch.save` checkpoint read by the safe unpickler (`torch_pickle`); torch is not imported.
  Both the zip format (torch >= 1.6) and the legacy one (`torch_legacy`) are read."""

  def __init__(self, path, *, subkey: str | None = "auto"):
    self.path = pathlib.Path(path)
    self._archive = (TorchLegacyArchive if is_legacy_torch_file(self.path) else TorchZipArchive)(self.path)
    try:
      self._t, self.subkey = _select(self._archive.obj, subkey, str(self.path))
    except BaseException:
      self._archive.close()
      raise
    self.name = f"{self.path}" + (f"[{self.subkey!r}]" if self.subkey else "")

  @property
  def raw(self) -> Any:
    """The whole unpickled object (tensors as `TorchTensorRef`), e.g. to read `epoch`."""
    return self._archive.obj

  def keys(self):
    return list(self._t)

  def _ref(self, key) -> TorchTensorRef:
    if key not in self._t:
      raise self._missing(key)
    return self._t[key]

  def shape(self, key):
    return self._ref(key).shape

  def dtype(self, key):
    return self._ref(key).dtype

  def get(self, key):
    return self._ref(key).numpy()

  def __contains__(self, key):
    return key in self._t

  def close(self):
    self._archive.close()


class ShardedSource(TensorSource):
  """The union of several sources (shards); `key_to_source` says which source holds each key."""

  def __init__(self, sources: list[TensorSource], key_to_source: dict[str, int], name: str):
    self._sources, self._where, self.name = sources, key_to_source, name
    order = {k: i for s in sources for i, k in enumerate(s.keys())}
    self._keys = sorted(key_to_source, key=lambda k: (key_to_source[k], order.get(k, 0)))

  def keys(self):
    return list(self._keys)

  def _src(self, key) -> TensorSource:
    if key not in self._where:
      raise self._missing(key)
    return self._sources[self._where[key]]

  def shape(self, key):
    return self._src(key).shape(key)

  def dtype(self, key):
    return self._src(key).dtype(key)

  def get(self, key):
    return self._src(key).get(key)

  def __contains__(self, key):
    return key in self._where

  def close(self):
    for s in self._sources:
      s.close()


def _safetensors(path: pathlib.Path, subkey) -> SafetensorsSource:
  if subkey not in ("auto", None):
    raise ValueError(f"{path}: subkey={subkey!r} only applies to torch checkpoints, not safetensors")
  return SafetensorsSource(path)


def _open_file(path: pathlib.Path, subkey) -> TensorSource:
  if path.name.endswith(".index.json"):
    return _open_index(path, subkey)
  if path.suffix == ".safetensors":
    return _safetensors(path, subkey)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04" or path.suffix in TORCH_SUFFIXES or is_legacy_torch_file(path):
    return TorchSource(path, subkey=subkey)
  try:
    return _safetensors(path, subkey)
  except ValueError:
    raise ValueError(f"{path}: unrecognised weight file (expected .safetensors, a *.index.json, or a torch "
                     f"zip checkpoint {'/'.join(TORCH_SUFFIXES)})") from None


def _union(paths: list[pathlib.Path], subkey, name: str, expected: dict[str, str] | None = None) -> TensorSource:
  sources: list[TensorSource] = []
  where: dict[str, int] = {}
  try:
    for p in paths:
      src = _open_file(p, subkey)
      sources.append(src)
      for k in src.keys():
        if k in where:
          raise ValueError(f"{name}: tensor {k!r} appears in both {paths[where[k]].name} and {p.name}")
        where[k] = len(sources) - 1
    if expected is not None:
      wrong = sorted(k for k, f in expected.items() if k not in where or paths[where[k]].name != pathlib.Path(f).name)
      extra = sorted(set(where) - set(expected))
      if wrong or extra:
        raise ValueError(f"{name}: index does not match its shards; listed but not in the named shard: "
                         f"{wrong[:20]}{'...' if len(wrong) > 20 else ''}; in shards but not listed: "
                         f"{extra[:20]}{'...' if len(extra) > 20 else ''}")
  except BaseException:
    for s in sources:
      s.close()
    raise
  return ShardedSource(sources, where, name)


def _open_index(index: pathlib.Path, subkey) -> TensorSource:
  from pixart_jax.convert.hub import read_json
  weight_map = read_json(index, "sharded-checkpoint index").get("weight_map")
  if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
    raise ValueError(f"{index}: not a sharded-checkpoint index: 'weight_map' must be an object mapping tensor names "
                     f"to shard file names, got {type(weight_map).__name__}")
  bad = sorted(f for f in set(weight_map.values()) if pathlib.PurePath(f).name != f)
  if bad:
    raise ValueError(f"{index}: shard names {bad[:5]} are paths; an index may only name files next to it")
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not (index.parent / f).is_file()]
  if missing:
    raise FileNotFoundError(f"{index}: shard files missing: {missing}")
  return _union([index.parent / f for f in files], subkey, str(index), expected=weight_map)


def _open_dir(d: pathlib.Path, subkey) -> TensorSource:
  st = sorted(d.glob("*.safetensors"))
  st_index = sorted(d.glob("*.safetensors.index.json"))
  if len(st_index) > 1:
    raise ValueError(f"{d}: several safetensors index files {[p.name for p in st_index]}; pass one explicitly")
  if st_index:
    return _open_index(st_index[0], subkey)
  if len(st) == 1:
    return _safetensors(st[0], subkey)
  if st:
    return _union(st, subkey, str(d))
  pt_index = sorted(p for p in d.glob("*.index.json"))
  if len(pt_index) == 1:
    return _open_index(pt_index[0], subkey)
  pts = sorted(p for p in d.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
  if len(pts) == 1:
    return TorchSource(pts[0], subkey=subkey)
  found = sorted(p.name for p in d.iterdir())[:20]
  raise FileNotFoundError(f"{d}: no single weight file to read (no *.safetensors, no index json, "
                          f"{len(pts)} torch files); directory holds {found}")


def open_tensors(path, *, subkey: str | None = "auto") -> TensorSource:
  """Opens weights lazily. `path`: a `.safetensors` file, a `*.index.json` (sharded), a directory, or a
  torch checkpoint (`.pth/.pt/.bin/.ckpt`, zip or legacy format, read without torch and without running
  pickled code).

  A directory is read through its `*.safetensors.index.json` if it has one, else as the union of all its
  `*.safetensors` (a key in two files is an error), else through a single torch file (or its index).
  `subkey` (torch files only): "auto" takes the `state_dict` entry if present, else the top-level tensors,
  else a lone `model`/`module` dict; None takes the top-level tensors; any other string names the entry
  (dots descend). Non-tensor entries (epoch, optimizer state, ...) are ignored.
  """
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"no weights at {p}")
  return _open_dir(p, subkey) if p.is_dir() else _open_file(p, subkey)
