"""Precomputed-latent record schema, safe (pickle-free) serialization, and atomic shard writing.

One record = one training image:

  name              str     source name of the image (file path, manifest row, TFDS index)
  bucket            str     bucket key of the resolution table ("0.57", "1.0", ...)
  orig_size         (int, int)  original image (height, width) in pixels
  mean, std         h w C   bfloat16 VAE posterior mean and std (std = exp(0.5 clip(logvar, -30, 20)))
  caption           str     the caption
  caption_emb       n D     bfloat16 T5 embedding TRIMMED to its n real tokens (mask = ones(n) + zeros)
  caption_len       int     n (stored explicitly; checked against caption_emb on decode)
  long_caption*     optional, same three fields for a long caption (e.g. ShareGPT4V)
  meta              {str: int | float | str | bool}, free per-source metadata (e.g. a class label)
  control           optional h w C bfloat16: the VAE posterior mean of the example's control image (ControlNet
                    training data, `data.control`)

Serialization is a msgpack map of plain values; every array is {"dtype", "shape", "data" (raw
bytes, C order)} with the dtype drawn from a fixed allow-list, so decoding never executes code and
round-trips stored values bitwise.

Shards. A dataset directory holds `data-XXXXX.array_record` (records, `group_size:1` for random
access) and, per shard, `data-XXXXX.json` (the shard index: the bucket and name of every record in
file order, plus the source items skipped while writing it with their reason). Both are written to
temporary names and renamed when the shard is complete; the `.json` is renamed last and is the
completion marker, so an interrupted run loses at most the shard in flight.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_dtypes
import msgpack
import numpy as np

RECORD_FORMAT = "pixart_jax.latent_record/1"
SHARD_INDEX_FORMAT = "pixart_jax.shard_index/1"
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"

BF16 = np.dtype(ml_dtypes.bfloat16)
_DTYPES = {np.dtype(n).name: np.dtype(n) for n in (
    "float32", "float16", "int32", "int16", "int8", "uint8", "int64", "bool")}
_DTYPES["bfloat16"] = BF16
_META_TYPES = (int, float, str, bool)


class RecordError(ValueError):
  """A record that is malformed (wrong format, dtype, shape or field)."""


@dataclasses.dataclass
class LatentRecord:
  """One precomputed example (see the module docstring for the fields and shapes)."""

  name: str
  bucket: str
  orig_size: tuple[int, int]
  mean: np.ndarray          # h w C bfloat16
  std: np.ndarray           # h w C bfloat16
  caption: str
  caption_emb: np.ndarray   # n D bfloat16
  long_caption: str | None = None
  long_caption_emb: np.ndarray | None = None  # m D bfloat16
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  control: np.ndarray | None = None  # h w C bfloat16 (optional)

  @property
  def caption_len(self) -> int:
    return int(self.caption_emb.shape[0])

  @property
  def long_caption_len(self) -> int | None:
    return None if self.long_caption_emb is None else int(self.long_caption_emb.shape[0])

  def validate(self) -> "LatentRecord":
    """Checks types, dtypes and shapes; raises RecordError naming the problem."""
    for f in ("name", "bucket", "caption"):
      if not isinstance(getattr(self, f), str):
        raise RecordError(f"record field {f!r} must be a str, got {type(getattr(self, f)).__name__}")
    if len(self.orig_size) != 2 or any(not isinstance(v, (int, np.integer)) for v in self.orig_size):
      raise RecordError(f"record {self.name!r}: orig_size must be (height, width) ints, got "
                        f"{self.orig_size!r}")
    for f in ("mean", "std"):
      a = getattr(self, f)
      if not isinstance(a, np.ndarray) or a.ndim != 3 or a.dtype != BF16:
        raise RecordError(f"record {self.name!r}: {f} must be an h w C bfloat16 array, got "
                          f"{getattr(a, 'shape', None)} {getattr(a, 'dtype', type(a).__name__)}")
    if self.mean.shape != self.std.shape:
      raise RecordError(f"record {self.name!r}: mean {self.mean.shape} and std {self.std.shape} differ")
    if self.control is not None and (not isinstance(self.control, np.ndarray) or self.control.dtype != BF16
                                     or self.control.shape != self.mean.shape):
      raise RecordError(f"record {self.name!r}: control must be a {self.mean.shape} bfloat16 array, got "
                        f"{getattr(self.control, 'shape', None)} {getattr(self.control, 'dtype', None)}")
    embs = [("caption_emb", self.caption_emb)]
    if (self.long_caption is None) != (self.long_caption_emb is None):
      raise RecordError(f"record {self.name!r}: long_caption and long_caption_emb must be given together")
    if self.long_caption_emb is not None:
      embs.append(("long_caption_emb", self.long_caption_emb))
    for f, a in embs:
      if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != BF16 or a.shape[0] < 1:
        raise RecordError(f"record {self.name!r}: {f} must be an n D bfloat16 array with n >= 1, "
                          f"got {getattr(a, 'shape', None)} {getattr(a, 'dtype', None)}")
    if len(embs) == 2 and embs[0][1].shape[1] != embs[1][1].shape[1]:
      raise RecordError(f"record {self.name!r}: caption and long caption widths differ")
    if not isinstance(self.meta, Mapping) or any(
        not isinstance(k, str) or not isinstance(v, _META_TYPES) for k, v in self.meta.items()):
      raise RecordError(f"record {self.name!r}: meta must map str to int/float/str/bool, got "
                        f"{self.meta!r}")
    return self


def _pack_array(a: np.ndarray) -> dict:
  a = np.ascontiguousarray(a)
  if a.dtype.name not in _DTYPES:
    raise RecordError(f"dtype {a.dtype} is not storable; allowed: {sorted(_DTYPES)}")
  return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def _unpack_array(d: Any, field: str) -> np.ndarray:
  if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
    raise RecordError(f"field {field!r} is not an encoded array")
  dtype = _DTYPES.get(d["dtype"])
  if dtype is None:
    raise RecordError(f"field {field!r} has a disallowed dtype {d['dtype']!r}")
  shape = d["shape"]
  if not isinstance(shape, list) or any(not isinstance(s, int) or s < 0 for s in shape):
    raise RecordError(f"field {field!r} has a bad shape {shape!r}")
  data = d["data"]
  if not isinstance(data, bytes) or len(data) != int(np.prod(shape)) * dtype.itemsize:
    raise RecordError(f"field {field!r}: {len(data)} bytes do not hold {shape} {dtype.name}")
  return np.frombuffer(data, dtype=dtype).reshape(shape)


def _no_ext(code, data):
  raise RecordError(f"msgpack extension type {code} is not allowed in a record")


def serialize_record(rec: LatentRecord) -> bytes:
  """LatentRecord -> bytes (msgpack; validated first)."""
  rec.validate()
  d = {
      "format": RECORD_FORMAT, "name": rec.name, "bucket": rec.bucket,
      "orig_size": [int(v) for v in rec.orig_size],
      "mean": _pack_array(rec.mean), "std": _pack_array(rec.std),
      "caption": rec.caption, "caption_emb": _pack_array(rec.caption_emb),
      "caption_len": rec.caption_len, "meta": dict(rec.meta),
  }
  if rec.long_caption_emb is not None:
    d.update(long_caption=rec.long_caption, long_caption_emb=_pack_array(rec.long_caption_emb),
             long_caption_len=rec.long_caption_len)
  if rec.control is not None:
    d["control"] = _pack_array(rec.control)
  return msgpack.packb(d, use_bin_type=True)


def deserialize_record(data: bytes) -> LatentRecord:
  """bytes -> LatentRecord (arrays are read-only views of `data`). Raises RecordError if malformed."""
  try:
    d = msgpack.unpackb(data, raw=False, ext_hook=_no_ext, strict_map_key=True)
  except RecordError:
    raise
  except Exception as e:  # msgpack raises several unrelated exception types
    raise RecordError(f"record is not valid msgpack: {e}") from e
  if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
    fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
    raise RecordError(f"not a {RECORD_FORMAT} record (format {fmt!r})")
  try:
    rec = LatentRecord(
        name=d["name"], bucket=d["bucket"], orig_size=tuple(d["orig_size"]),
        mean=_unpack_array(d["mean"], "mean"), std=_unpack_array(d["std"], "std"),
        caption=d["caption"], caption_emb=_unpack_array(d["caption_emb"], "caption_emb"),
        meta=d.get("meta", {}))
    if "long_caption_emb" in d:
      rec.long_caption = d["long_caption"]
      rec.long_caption_emb = _unpack_array(d["long_caption_emb"], "long_caption_emb")
    if "control" in d:
      rec.control = _unpack_array(d["control"], "control")
  except KeyError as e:
    raise RecordError(f"record is missing field {e.args[0]!r}") from None
  rec.validate()
  if d.get("caption_len") != rec.caption_len or d.get("long_caption_len") != rec.long_caption_len:
    raise RecordError(f"record {rec.name!r}: stored token counts do not match the embeddings")
  return rec


# ---------------------------------------------------------------------------------------------
# Shards


def shard_stem(shard_id: int) -> str:
  return f"data-{shard_id:05d}"


def shard_paths(out_dir: str | os.PathLike, shard_id: int) -> tuple[str, str]:
  """(records path, index path) of a shard."""
  stem = os.path.join(os.fspath(out_dir), shard_stem(shard_id))
  return stem + ".array_record", stem + ".json"


def is_shard_done(out_dir: str | os.PathLike, shard_id: int) -> bool:
  rec_path, idx_path = shard_paths(out_dir, shard_id)
  return os.path.isfile(idx_path) and os.path.isfile(rec_path)


def read_shard_index(out_dir: str | os.PathLike, shard_id: int) -> dict:
  _, idx_path = shard_paths(out_dir, shard_id)
  try:
    with open(idx_path, encoding="utf-8") as f:
      idx = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise RecordError(f"{idx_path} is not a valid {SHARD_INDEX_FORMAT} shard index (not JSON: {e})") from None
  fields = {"buckets": list, "records": int, "skipped": list, "names": list}
  if (not isinstance(idx, dict) or idx.get("format") != SHARD_INDEX_FORMAT
      or any(not isinstance(idx.get(k), t) for k, t in fields.items()) or len(idx["buckets"]) != idx["records"]):
    raise RecordError(f"{idx_path} is not a valid {SHARD_INDEX_FORMAT} shard index (needs format, records, "
                      "buckets, names and skipped, with one bucket per record)")
  return idx


class ShardWriter:
  """Writes one shard under temporary names; `commit()` renames it into place (index last).

      w = ShardWriter(out_dir, 3, source_range=(768, 1024))
      w.write(record); w.skip("a.jpg", "corrupt", "image file is truncated")
      w.commit()   # or w.abort() on error
  """

  def __init__(self, out_dir: str | os.PathLike, shard_id: int, *, source_range=(0, 0),
               tmp_tag: str = "tmp"):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.shard_id = shard_id
    self.rec_path, self.idx_path = shard_paths(out_dir, shard_id)
    self._tmp_rec = f"{self.rec_path}.{tmp_tag}"
    self._tmp_idx = f"{self.idx_path}.{tmp_tag}"
    self._writer = ArrayRecordWriter(self._tmp_rec, ARRAY_RECORD_OPTIONS)
    self.buckets: list[str] = []
    self.names: list[str] = []
    self.skipped: list[dict] = []
    self.source_range = [int(source_range[0]), int(source_range[1])]

  def write(self, rec: LatentRecord) -> None:
    self._writer.write(serialize_record(rec))
    self.buckets.append(rec.bucket)
    self.names.append(rec.name)

  def skip(self, name: str, reason: str, detail: str) -> None:
    self.skipped.append({"name": name, "reason": reason, "detail": detail})

  def commit(self) -> dict:
    """Closes the records file and renames both files into place. Returns the shard index."""
    self._writer.close()
    index = {"format": SHARD_INDEX_FORMAT, "shard": self.shard_id, "records": len(self.buckets),
             "source_range": self.source_range, "buckets": self.buckets, "names": self.names,
             "skipped": self.skipped}
    with open(self._tmp_idx, "w") as f:
      json.dump(index, f)
    os.replace(self._tmp_rec, self.rec_path)
    os.replace(self._tmp_idx, self.idx_path)
    return index

  def abort(self) -> None:
    """Drops the partial shard (temporary files removed)."""
    try:
      self._writer.close()
    finally:
      for p in (self._tmp_rec, self._tmp_idx):
        if os.path.exists(p):
          os.remove(p)
