"""`prepare`: images + captions -> ArrayRecord shards of VAE moments and trimmed T5 embeddings.

Output directory:

  .pixart_output.json      the marker (`pixart_jax.outputs`): written first when `prepare` takes the folder.
                           `prepare` writes only into a new or empty folder or one holding its marker (a rerun
                           resumes; `--overwrite` replaces a dataset of another configuration); never into or
                           around its input folder, never into a folder holding anything else
  prepare_config.json      what the run was asked to do (source, table, shard size, encoders, filters);
                           a rerun with a different config is refused instead of mixing datasets
  data-XXXXX.array_record  the records of source items [X * shard_size, (X+1) * shard_size)
  data-XXXXX.json          its shard index (bucket and name of each record in file order, and the
                           items skipped with their reason); written last = the shard is complete
  null_caption.npy         T5("") float32 (300, D), all 300 rows (the CFG-dropout null caption;
                           its own mask has 1 token, training keeps the caption's mask)
  manifest.json            counts per bucket, the resolution table, encoder ids and sizes, shard
                           list, skipped-file report, versions

Records are stored in one set of shards with the bucket key in every record and in the shard
index; the loader builds per-bucket index lists from the shard indexes without reading records.
Hosts split the shards (shard j belongs to process j % process_count), so a rerun on another
number of hosts still resumes; each host writes its shards, then process 0 writes the manifest.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pixart_jax.convert.hub import read_json
from pixart_jax.data import buckets, image_io
from pixart_jax.data.encoders import Encoders
from pixart_jax.data.image_io import SkipExample
from pixart_jax.data.records import (BF16, LatentRecord, ShardWriter, is_shard_done, read_shard_index,
                                     shard_paths)
from pixart_jax.data.sources import Source
from pixart_jax.models.vae import moments_to_mean_std
from pixart_jax.outputs import claim_output

MANIFEST_FORMAT = "pixart_jax.latent_dataset/1"
MANIFEST = "manifest.json"
CONFIG = "prepare_config.json"
NULL_CAPTION = "null_caption.npy"


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """table: bucket table name (buckets.TABLES) or a {key: (H, W)} mapping. resample: PIL filter
  (None: the official choice for the table, buckets.train_resample). min_side / max_aspect: the
  size filters (image_io.check_size). num_threads: image decode/resize threads. max_image_bytes: image files
  larger than this are skipped (default 256 MiB); only regular files are read."""

  table: str | Mapping[str, tuple[int, int]] = "1024"
  shard_size: int = 256
  batch_size: int = 32
  resample: str | None = None
  min_side: int = 64
  max_aspect: float = 4.5
  num_threads: int = 8
  max_image_bytes: int = image_io.DEFAULT_MAX_IMAGE_BYTES  # larger image files are skipped ("too_large")
  control: str | None = None  # ControlNet data: "canny" | "blur" | "image" (`data.control`); None: no control
  control_sigma: float = 1.0  # pixels: the blur's / Canny smoothing's Gaussian sigma

  def validate(self) -> None:
    for f in ("shard_size", "batch_size", "min_side", "num_threads", "max_image_bytes"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"PrepareOptions.{f} must be a positive int, got {v!r}")
    if not self.max_aspect >= 1:
      raise ValueError(f"PrepareOptions.max_aspect must be >= 1, got {self.max_aspect!r}")
    from pixart_jax.data.control import check_kind
    check_kind(self.control)
    if not (isinstance(self.control_sigma, (int, float)) and 0 < self.control_sigma < float("inf")):
      raise ValueError(f"PrepareOptions.control_sigma must be a positive number of pixels, got {self.control_sigma!r}")

  @property
  def table_dict(self) -> dict[str, tuple[int, int]]:
    return {k: (int(h), int(w)) for k, (h, w) in buckets.get_table(self.table).items()}

  @property
  def resample_name(self) -> str:
    if self.resample is not None:
      return self.resample
    return buckets.train_resample(self.table) if isinstance(self.table, str) else "bicubic"


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for pkg in ("pixart_jax", "jax", "flax", "grain", "array_record", "numpy", "pillow", "msgpack"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def encoders_info(enc: Encoders) -> dict[str, Any]:
  return {"id": enc.encoder_id, "text_dim": int(enc.text_dim),
          "latent_channels": int(enc.latent_channels), "downsample": int(enc.downsample),
          "scaling_factor": float(enc.scaling_factor)}


def _write_json_atomic(path: str, obj: Any, tag: str = "tmp") -> None:
  tmp = f"{path}.{tag}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _source_dirs(source: Source) -> tuple[str | None, str | None]:
  """The folders the output must not overlap: a folder source's root (the output may be neither it, nor inside
  it, nor around it) and a manifest's folder (neither it nor around it: images may sit anywhere), None where the
  source has none."""
  while hasattr(source, "source") and hasattr(source, "indices"):  # a Subset
    source = source.source
  return tuple(d if isinstance(d, str) else None for d in (getattr(source, "root", None), getattr(source, "base", None)))


def _is_legacy_dataset(out_dir: str) -> bool:
  """A dataset written by a version without the marker: its prepare_config.json has our keys."""
  path = os.path.join(out_dir, CONFIG)
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(cfg, dict) and {"source", "source_items", "shard_size", "encoders", "table"} <= set(cfg)


def claim_output_dir(out_dir: str | os.PathLike, source: Source | None = None, *, overwrite: bool = False,
                     write_marker: bool = True) -> str:
  """Makes `out_dir` prepare's output before anything is written into it (`pixart_jax.outputs.claim_output`: a new
  or empty folder, or one prepare marked, which a rerun resumes; a dataset of an older version, recognised by its
  prepare_config.json, is adopted); never a folder overlapping `source`'s folders. Returns its absolute path."""
  root, base = _source_dirs(source)
  return os.fspath(claim_output(out_dir, tool="prepare", resume=True, overwrite=overwrite,
                                inputs={"the input folder": root, "the manifest's folder": base},
                                may_lie_inside=("the manifest's folder",),
                                adopt=lambda p: _is_legacy_dataset(os.fspath(p)), write_marker=write_marker))


def _clear_dataset(out_dir: str) -> None:
  """Deletes the dataset files prepare wrote into its own (marked) `out_dir`: config, manifest, null caption and
  shards. Nothing else there is touched."""
  for name in sorted(os.listdir(out_dir)):
    if name in (CONFIG, MANIFEST, NULL_CAPTION) or re.fullmatch(r"data-\d+\.(array_record|json)", name):
      os.remove(os.path.join(out_dir, name))


def _check_or_write_config(out_dir: str, config: dict, process_index: int, overwrite: bool) -> None:
  """Writes the run's config; a dataset already there with another config is refused, or replaced (all of prepare's
  files there deleted first, on process 0) with `overwrite`."""
  path = os.path.join(out_dir, CONFIG)
  if os.path.exists(path):
    old = read_json(path, "prepare config")
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if not diff:
      return
    if not overwrite:
      details = "; ".join(f"{k}: was {old.get(k)!r}, now {config.get(k)!r}" for k in diff)
      raise ValueError(f"{out_dir} holds a dataset prepared with a different configuration "
                       f"({details}); use a new --out directory, or pass --overwrite to replace that dataset")
    if process_index != 0:
      raise ValueError(f"{out_dir}: --overwrite of a dataset with another configuration runs on one host")
    _clear_dataset(out_dir)
  _write_json_atomic(path, config, tag=f"tmp{process_index}")


@dataclasses.dataclass
class _Loaded:
  example: Any
  bucket: str
  orig_size: tuple[int, int]
  pixels: np.ndarray  # H W 3 uint8, the bucket size
  control: np.ndarray | None = None  # H W 3 uint8 control image at the bucket size (PrepareOptions.control)


@dataclasses.dataclass
class _Skipped:
  name: str
  reason: str
  detail: str


def _lookahead_map(pool, fn: Callable, items: Iterable, depth: int) -> Iterator:
  """pool.map in order with at most `depth` items in flight (bounded memory)."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= depth:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


_mean_std_bf16 = jax.jit(lambda m: tuple(a.astype(jnp.bfloat16) for a in moments_to_mean_std(m)))


class _ShardEncoder:
  """Loads, buckets, encodes and writes the items of one shard."""

  def __init__(self, source: Source, enc: Encoders, opts: PrepareOptions, pool, progress):
    self.source, self.enc, self.opts, self.pool, self.progress = source, enc, opts, pool, progress
    self.table = opts.table_dict
    self.resample = opts.resample_name
    self.skipped = 0

  def load(self, i: int):
    try:
      ex = self.source[i]
    except SkipExample as e:
      return _Skipped(e.name or f"item {i}", e.reason, e.detail)
    try:
      img = image_io.decode_image(ex.image, max_bytes=self.opts.max_image_bytes)
      h, w = img.shape[:2]
      image_io.check_size(h, w, min_side=self.opts.min_side, max_aspect=self.opts.max_aspect)
      key, (bh, bw) = buckets.closest_bucket(h, w, self.table)
      pixels = buckets.resize_and_center_crop(img, bh, bw, self.resample)
      control = None
      if self.opts.control is not None:
        from pixart_jax.data.control import control_pixels
        control = control_pixels(self.opts.control, pixels, getattr(ex, "control_image", None),
                                 sigma=self.opts.control_sigma, resample=self.resample)
      return _Loaded(ex, key, (h, w), pixels, control)
    except SkipExample as e:
      return _Skipped(ex.name, e.reason, e.detail)

  def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
    """texts -> trimmed bf16 (n_i, D) embeddings; batches padded to batch_size with ""."""
    out, bs = [], self.opts.batch_size
    for s in range(0, len(texts), bs):
      chunk = texts[s:s + bs]
      emb, mask = self.enc.encode_text(chunk + [""] * (bs - len(chunk)))
      emb, mask = np.asarray(emb), np.asarray(mask)
      if emb.shape[:2] != mask.shape or emb.shape[2] != self.enc.text_dim:
        raise ValueError(f"encode_text returned {emb.shape} / {mask.shape}; expected (B, S, "
                         f"{self.enc.text_dim}) and (B, S)")
      for j in range(len(chunk)):
        n = int(mask[j].sum())
        if n < 1 or not mask[j, :n].all():
          raise ValueError(f"caption mask of {chunk[j][:60]!r} is not a non-empty prefix of ones")
        out.append(emb[j, :n].astype(BF16))
    return out

  def flush(self, items: list[_Loaded], writer: ShardWriter) -> None:
    bs, ds, c = self.opts.batch_size, self.enc.downsample, self.enc.latent_channels
    x = np.zeros((bs,) + items[0].pixels.shape, np.float32)
    for j, it in enumerate(items):
      x[j] = image_io.to_model_input(it.pixels)
    moments = np.asarray(self.enc.encode_images(x))
    bh, bw = items[0].pixels.shape[:2]
    if moments.shape != (bs, bh // ds, bw // ds, 2 * c):
      raise ValueError(f"encode_images returned {moments.shape} for {x.shape}; expected "
                       f"{(bs, bh // ds, bw // ds, 2 * c)}")
    mean, std = (np.asarray(a) for a in _mean_std_bf16(moments[:len(items)]))
    control = [None] * len(items)
    if self.opts.control is not None:  # the control images through the same encoder: their posterior means
      xc = np.zeros_like(x)
      for j, it in enumerate(items):
        xc[j] = image_io.to_model_input(it.control)
      control = np.asarray(_mean_std_bf16(np.asarray(self.enc.encode_images(xc)))[0])
    has_long = [j for j, it in enumerate(items) if it.example.long_caption is not None]
    embs = self.encode_texts([it.example.caption for it in items] +
                             [items[j].example.long_caption for j in has_long])
    long_embs = dict(zip(has_long, embs[len(items):]))
    for j, it in enumerate(items):
      ex = it.example
      writer.write(LatentRecord(
          name=ex.name, bucket=it.bucket, orig_size=it.orig_size, mean=mean[j], std=std[j],
          caption=ex.caption, caption_emb=embs[j], long_caption=ex.long_caption,
          long_caption_emb=long_embs.get(j), meta=dict(ex.meta), control=control[j]))

  def run(self, writer: ShardWriter, start: int, stop: int) -> None:
    pending: dict[str, list[_Loaded]] = collections.defaultdict(list)
    depth = 2 * self.opts.batch_size + 2 * self.opts.num_threads
    for res in _lookahead_map(self.pool, self.load, range(start, stop), depth):
      self.progress.update(1)
      if isinstance(res, _Skipped):
        writer.skip(res.name, res.reason, res.detail)
        self.skipped += 1
        self.progress.set_postfix(skipped=self.skipped, refresh=False)
        continue
      group = pending[res.bucket]
      group.append(res)
      if len(group) == self.opts.batch_size:
        self.flush(pending.pop(res.bucket), writer)
    for key in sorted(pending):
      self.flush(pending[key], writer)


def write_manifest(out_dir: str, *, num_shards: int, table: Mapping[str, tuple[int, int]],
                   table_name: str | None, encoders: dict, null_caption: np.ndarray,
                   extra: dict | None = None) -> dict:
  """Aggregates the shard indexes into manifest.json and writes null_caption.npy; returns it."""
  missing = [j for j in range(num_shards) if not is_shard_done(out_dir, j)]
  if missing:
    raise RuntimeError(f"cannot write the manifest: shards {missing[:10]} of {num_shards} are "
                       "missing (did a host fail? is the output directory shared by all hosts? "
                       "rerun prepare to finish them)")
  counts: collections.Counter = collections.Counter()
  shards, skipped = [], []
  for j in range(num_shards):
    idx = read_shard_index(out_dir, j)
    counts.update(idx["buckets"])
    skipped.extend(idx["skipped"])
    rec_path, idx_path = shard_paths(out_dir, j)
    shards.append({"records_file": os.path.basename(rec_path),
                   "index_file": os.path.basename(idx_path), "records": idx["records"]})
  ds = encoders["downsample"]
  null = np.asarray(null_caption, np.float32)
  if null.ndim != 2 or null.shape[1] != encoders["text_dim"]:
    raise ValueError(f"null caption must be (S, {encoders['text_dim']}), got {null.shape}")
  tmp = os.path.join(out_dir, NULL_CAPTION + ".tmp.npy")
  np.save(tmp, null, allow_pickle=False)
  os.replace(tmp, os.path.join(out_dir, NULL_CAPTION))
  manifest = {
      "format": MANIFEST_FORMAT,
      "num_records": int(sum(counts.values())),
      "buckets": {k: {"height": h, "width": w, "latent_shape": [h // ds, w // ds,
                                                                  encoders["latent_channels"]],
                      "count": int(counts[k])}
                  for k, (h, w) in table.items() if counts[k]},
      "table_name": table_name,
      "table": {k: [int(h), int(w)] for k, (h, w) in table.items()},
      "encoders": encoders,
      "caption_max_length": int(null.shape[0]),
      "null_caption": NULL_CAPTION,
      "shards": shards,
      "skipped": {"count": len(skipped),
                  "by_reason": dict(collections.Counter(s["reason"] for s in skipped)),
                  "files": skipped},
      "versions": versions(),
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      **(extra or {}),
  }
  _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


def _default_barrier(process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("pixart_jax.prepare")


def prepare(source: Source, encoders: Encoders, out_dir: str | os.PathLike, *,
            options: PrepareOptions = PrepareOptions(), source_id: str = "",
            process_index: int | None = None, process_count: int | None = None,
            barrier: Callable[[], None] | None = None, progress: bool = True,
            overwrite: bool = False) -> dict | None:
  """Encodes `source` into `out_dir` (module doc); resumes finished shards. Returns the manifest
  on process 0 (None elsewhere). Bad images are skipped and reported, never raised.
  `out_dir` must be new, empty or prepare's own (`claim_output_dir`); overwrite=True replaces a dataset prepared
  there with another configuration."""
  from tqdm.auto import tqdm
  options.validate()
  out_dir = os.fspath(out_dir)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n = len(source)
  if n == 0:
    raise ValueError(f"source {source_id!r} is empty")
  table = options.table_dict
  config = {"source": source_id, "source_items": n, "table": {k: list(v) for k, v in table.items()},
            "shard_size": options.shard_size, "encoders": encoders_info(encoders),
            "resample": options.resample_name, "min_side": options.min_side,
            "max_aspect": options.max_aspect}
  if options.control is not None:  # only then: datasets prepared before control existed keep their config
    config.update(control=options.control, control_sigma=options.control_sigma)
  claim_output_dir(out_dir, source, overwrite=overwrite)
  _check_or_write_config(out_dir, config, pi, overwrite)
  num_shards = math.ceil(n / options.shard_size)
  mine = [j for j in range(pi, num_shards, pc)]
  todo = [j for j in mine if not is_shard_done(out_dir, j)]
  ranges = {j: (j * options.shard_size, min(n, (j + 1) * options.shard_size)) for j in todo}
  bar = tqdm(total=sum(b - a for a, b in ranges.values()), unit="img", disable=not progress,
             desc=f"prepare (host {pi}/{pc}, {len(mine) - len(todo)} of {len(mine)} shards done)")
  with concurrent.futures.ThreadPoolExecutor(options.num_threads) as pool:
    worker = _ShardEncoder(source, encoders, options, pool, bar)
    for j in todo:
      a, b = ranges[j]
      writer = ShardWriter(out_dir, j, source_range=(a, b), tmp_tag=f"tmp{pi}")
      try:
        worker.run(writer, a, b)
      except BaseException:
        writer.abort()
        raise
      writer.commit()
  bar.close()
  (barrier or (lambda: _default_barrier(pc)))()
  if pi != 0:
    return None
  emb, mask = encoders.encode_text([""] * options.batch_size)
  table_name = options.table if isinstance(options.table, str) else None
  extra = {k: config[k] for k in ("source", "source_items", "shard_size", "resample", "min_side",
                                  "max_aspect", "control", "control_sigma") if k in config}
  return write_manifest(out_dir, num_shards=num_shards, table=table, table_name=table_name,
                        encoders=encoders_info(encoders), null_caption=np.asarray(emb)[0],
                        extra=extra)


def format_report(manifest: dict) -> str:
  """A human summary: records per bucket and every skipped file with its reason."""
  lines = [f"{manifest['num_records']} records in {len(manifest['buckets'])} buckets, "
           f"{manifest['skipped']['count']} skipped"]
  for k, b in manifest["buckets"].items():
    lines.append(f"  bucket {k:>5} {b['height']}x{b['width']}: {b['count']}")
  for s in manifest["skipped"]["files"]:
    lines.append(f"  skipped {s['name']}: {s['reason']} ({s['detail']})")
  return "\n".join(lines)
