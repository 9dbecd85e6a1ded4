"""Streaming safetensors writers, in the layout diffusers / transformers read.

    save_safetensors_sharded(((k, np.asarray(v)) for k, v in items), "out/transformer")
    # -> out/transformer/diffusion_pytorch_model.safetensors                       (fits in one shard)
    # -> diffusion_pytorch_model-00001-of-00003.safetensors ... + diffusion_pytorch_model.safetensors.index.json
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Iterable, Mapping

import numpy as np

from pixart_jax.convert.sources import SAFETENSORS_DTYPES

__all__ = ["write_safetensors", "save_safetensors_sharded", "replace_atomically"]

_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}


def _as_array(key: str, value) -> np.ndarray:
  arr = np.asarray(value)  # numpy or jax arrays (jax copies to host here)
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  if arr.dtype not in _CODES:
    raise TypeError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors "
                    f"(supported: {sorted(str(d) for d in _CODES)})")
  return arr


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
  meta = {"format": "pt"}  # transformers refuses safetensors files whose metadata lacks a known format
  for k, v in (metadata or {}).items():
    if not isinstance(k, str) or not isinstance(v, str):
      raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
    meta[k] = v
  return meta


def write_safetensors(path, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes one `.safetensors` file (all tensors are held until written). Returns its path."""
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  arrays = []
  seen = set()
  for key, value in items:
    if key in seen:
      raise ValueError(f"tensor {key!r} given twice")
    seen.add(key)
    arrays.append((key, _as_array(key, value)))
  # widest dtypes first so every tensor stays aligned to its item size (the header is padded to 8 bytes)
  arrays.sort(key=lambda kv: -kv[1].dtype.itemsize)
  header: dict = {"__metadata__": _metadata(metadata)}
  offset = 0
  for key, arr in arrays:
    header[key] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  path = pathlib.Path(path)

  def write(f):
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for _, arr in arrays:
      if arr.size:
        f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))

  return replace_atomically(path, write)


def replace_atomically(path, write, *, mode: str = "wb") -> pathlib.Path:
  """Calls `write(f)` on a temporary file next to `path`, then renames it onto `path` (os.replace): a file that
  was there stays whole until the new one is complete, and a failed write leaves no partial file behind."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def _stale(out_dir: pathlib.Path, prefix: str) -> list[pathlib.Path]:
  pat = re.compile(re.escape(prefix) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
  return [p for p in out_dir.iterdir() if pat.fullmatch(p.name)]


def save_safetensors_sharded(tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray], out_dir, *,
                             prefix: str = "diffusion_pytorch_model", max_shard_bytes: int = 10 * 2**30,
                             metadata: Mapping[str, str] | None = None) -> list[pathlib.Path]:
  """Streams `(key, array)` pairs into safetensors shards of at most `max_shard_bytes` (a larger tensor gets
  a shard of its own). One shard: `<prefix>.safetensors`. Several: `<prefix>-00001-of-0000N.safetensors` plus
  `<prefix>.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {key: file}}), the
  diffusers / transformers format. At most one shard's arrays are held at a time. Files from an earlier save
  with the same prefix are removed. Returns the shard paths in order.
  """
  if isinstance(tensors, Mapping):
    tensors = tensors.items()
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  tmp_paths: list[pathlib.Path] = []
  shard_keys: list[list[str]] = []
  seen: set[str] = set()
  pending: list[tuple[str, np.ndarray]] = []
  pending_bytes = total = 0

  def flush():
    tmp = out_dir / f".{prefix}.tmp-{len(tmp_paths):05d}.safetensors"
    write_safetensors(tmp, pending, metadata=metadata)
    tmp_paths.append(tmp)
    shard_keys.append([k for k, _ in pending])

  try:
    for key, value in tensors:
      if key in seen:
        raise ValueError(f"tensor {key!r} given twice")
      seen.add(key)
      arr = _as_array(key, value)
      if pending and pending_bytes + arr.nbytes > max_shard_bytes:
        flush()
        pending, pending_bytes = [], 0
      pending.append((key, arr))
      pending_bytes += arr.nbytes
      total += arr.nbytes
      del arr, value
    if pending or not tmp_paths:
      flush()
    pending = []
  except BaseException:
    for p in tmp_paths:
      p.unlink(missing_ok=True)
    raise

  n = len(tmp_paths)
  names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for p in _stale(out_dir, prefix):
    if p.name not in names:
      p.unlink()
  final = []
  for tmp, name in zip(tmp_paths, names):
    os.replace(tmp, out_dir / name)
    final.append(out_dir / name)
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: name for keys, name in zip(shard_keys, names) for k in keys}}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    replace_atomically(out_dir / f"{prefix}.safetensors.index.json", lambda f: f.write(text), mode="w")
  return final
