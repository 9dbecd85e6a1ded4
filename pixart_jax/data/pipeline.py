"""Grain input pipeline over a prepared dataset: aspect-ratio buckets, global batches on the mesh.

Design (every host computes the same plan from the manifest, the global batch size and the seed):

  1. Per bucket, the sorted ids of its records (from the shard indexes; no record is read).
  2. Epoch e: each bucket's ids are permuted with SeedSequence([seed, e]) and cut into
     global_batch_size batches (the remainder is dropped for that epoch, as the official
     drop_last); the list of (bucket, batch) pairs of all buckets is permuted with the same
     generator. This schedule is identical on all hosts, so EVERY HOST TAKES THE SAME BUCKET AT
     THE SAME STEP, and each bucket is one compiled program.
  3. `grain.MapDataset.range(steps)` indexed by the global step -> for step g (epoch g // S) each
     host reads only the rows of that global batch its devices hold (from the batch sharding),
     decodes them, and the rows are assembled into global `jax.Array`s sharded over the mesh's
     batch axes. Hosts therefore read disjoint examples and the union over an epoch is every
     (non-dropped) example exactly once.
  4. Decode: the caption is the short one with probability `caption_ratio` (the official
     real_prompt_ratio; long captions are used otherwise when the record has one), padded to 300
     tokens with zeros and a mask; latent = (mean + std * N(0, 1)) * scaling_factor. The choice and
     the noise come from SeedSequence([seed, epoch, record id]): deterministic per example and
     epoch, independent of hosts, workers and batch layout. A dataset prepared with a control (ControlNet
     data, manifest "control") also gives "control": the record's control latent times scaling_factor.

The iterator state is the grain state (the next global step), so a restored iterator continues
with exactly the next batch; it is an Orbax item through `grain.checkpoint.CheckpointSave/Restore`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import grain
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding

from pixart_jax.data.prepare_lib import MANIFEST, MANIFEST_FORMAT
from pixart_jax.data.records import deserialize_record, read_shard_index
from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules, batch_axes, batch_shards, batch_sharding

INFINITE_STEPS = 2 ** 62
BATCH_KEYS = ("latents", "caption", "mask", "index")
OPTIONAL_KEYS = ("control",)  # present when the dataset has them (manifest "control": ControlNet data)


def load_manifest(data_dir: str | os.PathLike) -> dict:
  path = os.path.join(os.fspath(data_dir), MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {data_dir!r} a dataset written by prepare "
                            "(it writes the manifest last)?")
  from pixart_jax.convert.hub import read_json
  manifest = read_json(path, "prepared-dataset manifest")
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ValueError(f"{path} is not a {MANIFEST_FORMAT} manifest (format {manifest.get('format')!r})")
  return manifest


def null_caption(data_dir: str | os.PathLike) -> np.ndarray:
  """T5("") of the dataset's text encoder: (300, D) float32, all rows (pad positions included)."""
  manifest = load_manifest(data_dir)
  return np.load(os.path.join(os.fspath(data_dir), manifest["null_caption"]), allow_pickle=False)


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """Where the records are and which bucket each belongs to."""

  data_dir: str
  manifest: dict
  record_paths: tuple[str, ...]
  bucket_keys: tuple[str, ...]      # manifest order
  members: tuple[np.ndarray, ...]   # per bucket: sorted global record ids (int64)


def load_index(data_dir: str | os.PathLike) -> DatasetIndex:
  data_dir = os.fspath(data_dir)
  manifest = load_manifest(data_dir)
  keys = tuple(manifest["buckets"])
  pos = {k: i for i, k in enumerate(keys)}
  ids: list[list[int]] = [[] for _ in keys]
  paths, offset = [], 0
  for j, shard in enumerate(manifest["shards"]):
    idx = read_shard_index(data_dir, j)
    if idx["records"] != shard["records"]:
      raise ValueError(f"shard {j} has {idx['records']} records, the manifest says {shard['records']}")
    for r, key in enumerate(idx["buckets"]):
      if key not in pos:
        raise ValueError(f"shard {j} record {r} is in bucket {key!r}, absent from the manifest")
      ids[pos[key]].append(offset + r)
    offset += idx["records"]
    paths.append(os.path.join(data_dir, shard["records_file"]))
  for k, m in zip(keys, ids):
    if len(m) != manifest["buckets"][k]["count"]:
      raise ValueError(f"bucket {k!r}: {len(m)} records indexed, manifest count "
                       f"{manifest['buckets'][k]['count']}")
  return DatasetIndex(data_dir, manifest, tuple(paths), keys,
                      tuple(np.asarray(m, np.int64) for m in ids))


class BucketSchedule:
  """The per-epoch (bucket, batch) plan; a pure function of (members, global_batch_size, seed)."""

  def __init__(self, members: tuple[np.ndarray, ...], global_batch_size: int, seed: int):
    if global_batch_size < 1:
      raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.members, self.global_batch_size, self.seed = members, global_batch_size, seed
    self.batches_per_bucket = np.asarray([len(m) // global_batch_size for m in members], np.int64)
    self.steps_per_epoch = int(self.batches_per_bucket.sum())
    if self.steps_per_epoch == 0:
      raise ValueError(f"no bucket holds global_batch_size={global_batch_size} records (bucket "
                       f"sizes {[len(m) for m in members]}); lower the batch size")
    self.dropped_per_epoch = int(sum(len(m) for m in members)) - self.steps_per_epoch * global_batch_size
    self._cache: dict[int, tuple] = {}

  def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """-> (bucket id per step (S,), batch number per step (S,), per-bucket permuted record ids)."""
    if epoch not in self._cache:
      rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
      perms = [rng.permutation(m) for m in self.members]
      bucket = np.repeat(np.arange(len(self.members)), self.batches_per_bucket)
      number = np.concatenate([np.arange(n) for n in self.batches_per_bucket])
      order = rng.permutation(self.steps_per_epoch)
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = (bucket[order], number[order], perms)
    return self._cache[epoch]

  def global_batch(self, step: int) -> tuple[int, np.ndarray, int]:
    """step -> (bucket id, record ids (global_batch_size,), epoch)."""
    epoch, t = divmod(int(step), self.steps_per_epoch)
    bucket, number, perms = self.plan(epoch)
    b, k = int(bucket[t]), int(number[t])
    gb = self.global_batch_size
    return b, perms[b][k * gb:(k + 1) * gb], epoch


def example_rng(seed: int, epoch: int, record_id: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, int(record_id)])))


class LoadBatch:
  """Grain map: global step -> this host's rows of that batch, decoded (picklable for workers)."""

  def __init__(self, index: DatasetIndex, schedule: BucketSchedule, rows: np.ndarray, *,
               caption_ratio: float, caption_dtype: Any):
    self.paths, self.keys = index.record_paths, index.bucket_keys
    self.shapes = [tuple(index.manifest["buckets"][k]["latent_shape"]) for k in self.keys]
    self.schedule, self.rows = schedule, np.asarray(rows, np.int64)
    self.caption_ratio = float(caption_ratio)
    self.caption_dtype = np.dtype(caption_dtype)
    self.scaling_factor = np.float32(index.manifest["encoders"]["scaling_factor"])
    self.text_dim = int(index.manifest["encoders"]["text_dim"])
    self.max_length = int(index.manifest["caption_max_length"])
    self.has_control = bool(index.manifest.get("control"))  # ControlNet data: a control latent per record
    self._source = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  @property
  def source(self) -> grain.sources.ArrayRecordDataSource:
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(list(self.paths))
    return self._source

  def __call__(self, step: int) -> dict[str, Any]:
    b, ids, epoch = self.schedule.global_batch(step)
    ids = ids[self.rows]
    n, s = len(ids), self.max_length
    latents = np.empty((n,) + self.shapes[b], np.float32)
    control = np.empty((n,) + self.shapes[b], np.float32) if self.has_control else None
    caption = np.zeros((n, s, self.text_dim), self.caption_dtype)
    mask = np.zeros((n, s), np.int32)
    for i, raw in enumerate(self.source.__getitems__([int(r) for r in ids])):
      rec = deserialize_record(raw)
      if rec.bucket != self.keys[b] or rec.mean.shape != self.shapes[b]:
        raise ValueError(f"record {int(ids[i])} ({rec.name}) is bucket {rec.bucket} {rec.mean.shape}, "
                         f"the index says {self.keys[b]} {self.shapes[b]}: dataset files are mixed up")
      rng = example_rng(self.schedule.seed, epoch, ids[i])
      use_long = rng.random() >= self.caption_ratio and rec.long_caption_emb is not None
      emb = rec.long_caption_emb if use_long else rec.caption_emb
      k = min(emb.shape[0], s)
      caption[i, :k] = emb[:k]
      mask[i, :k] = 1
      noise = rng.standard_normal(rec.mean.shape, np.float32)
      latents[i] = (rec.mean.astype(np.float32) + rec.std.astype(np.float32) * noise) \
          * self.scaling_factor
      if control is not None:
        if rec.control is None:
          raise ValueError(f"record {int(ids[i])} ({rec.name}) has no control latent but the manifest says the "
                           "dataset has them: dataset files are mixed up")
        control[i] = rec.control.astype(np.float32) * self.scaling_factor
    out = {"latents": latents, "caption": caption, "mask": mask, "index": ids.astype(np.int32),
           "bucket": self.keys[b], "step": np.int64(step)}
    if control is not None:
      out["control"] = control
    return out


def checked_batch_sharding(mesh: jax.sharding.Mesh, global_batch_size: int,
                           rules: Rules = LOGICAL_RULES) -> NamedSharding:
  """`parallel.sharding.batch_sharding` of every batch array; the global batch must split evenly over it."""
  n = batch_shards(mesh, rules)
  if global_batch_size % n:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the mesh's batch "
                     f"axes {batch_axes(mesh, rules)} (size {n})")
  return batch_sharding(mesh, rules, 1)


def host_rows(sharding: NamedSharding | None, global_batch_size: int) -> np.ndarray:
  """Rows of the global batch this process must provide (sorted)."""
  if sharding is None:
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch_size % pc:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {pc} processes")
    per = global_batch_size // pc
    return np.arange(pi * per, (pi + 1) * per)
  rows: set[int] = set()
  for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*idx[0].indices(global_batch_size)))
  return np.asarray(sorted(rows), np.int64)


def abstract_batches(manifest: Mapping | str | os.PathLike, global_batch_size: int, *,
                     mesh: jax.sharding.Mesh | None = None, rules: Rules = LOGICAL_RULES,
                     caption_dtype: Any = ml_dtypes.bfloat16) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """{bucket key: {latents B h w C f32, caption B 300 D, mask B 300 int32, index B int32}} as
  ShapeDtypeStructs (with the batch sharding when `mesh` is given), for AOT compilation."""
  if not isinstance(manifest, Mapping):
    manifest = load_manifest(manifest)
  sh = None if mesh is None else checked_batch_sharding(mesh, global_batch_size, rules)
  s, d = int(manifest["caption_max_length"]), int(manifest["encoders"]["text_dim"])
  out = {}
  for key, b in manifest["buckets"].items():
    gb = global_batch_size
    out[key] = {"latents": jax.ShapeDtypeStruct((gb, *b["latent_shape"]), np.float32, sharding=sh),
                "caption": jax.ShapeDtypeStruct((gb, s, d), np.dtype(caption_dtype), sharding=sh),
                "mask": jax.ShapeDtypeStruct((gb, s), np.int32, sharding=sh),
                "index": jax.ShapeDtypeStruct((gb,), np.int32, sharding=sh)}
    if manifest.get("control"):  # ControlNet data: the control latent (B h w C f32, diffusion space)
      out[key]["control"] = jax.ShapeDtypeStruct((gb, *b["latent_shape"]), np.float32, sharding=sh)
  return out


class TrainIterator(grain.DatasetIterator):
  """Yields {latents, caption, mask, index: global jax.Arrays (numpy host rows without a mesh),
  bucket: str, step: int}. `get_state`/`set_state` (and Orbax via grain.checkpoint) resume exactly."""

  def __init__(self, inner: grain.DatasetIterator, *, sharding: NamedSharding | None,
               rows: np.ndarray, global_batch_size: int, fingerprint: dict,
               steps_per_epoch: int):
    super().__init__(inner)
    self._inner, self.sharding, self.rows = inner, sharding, rows
    self.global_batch_size, self.fingerprint = global_batch_size, fingerprint
    self.steps_per_epoch = steps_per_epoch
    self._slices: dict[tuple[int, int], slice] = {}

  def _local_slice(self, s: slice) -> slice:
    key = s.indices(self.global_batch_size)[:2]
    if key not in self._slices:
      start = int(np.searchsorted(self.rows, key[0]))
      self._slices[key] = slice(start, start + key[1] - key[0])
    return self._slices[key]

  def _to_global(self, local: np.ndarray) -> jax.Array:
    shape = (self.global_batch_size,) + local.shape[1:]
    return jax.make_array_from_callback(
        shape, self.sharding, lambda idx: local[(self._local_slice(idx[0]),) + tuple(idx[1:])])

  def __next__(self) -> dict[str, Any]:
    el = next(self._inner)
    out = {"bucket": el["bucket"], "step": int(el["step"])}
    for k in BATCH_KEYS + tuple(k for k in OPTIONAL_KEYS if k in el):
      out[k] = el[k] if self.sharding is None else self._to_global(el[k])
    return out

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._inner.get_state(), "pipeline": dict(self.fingerprint)}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("pipeline") != self.fingerprint:
      raise ValueError(f"iterator state was saved by a different pipeline: saved "
                       f"{state.get('pipeline')}, this one is {self.fingerprint}")
    self._inner.set_state(state["grain"])

  def close(self) -> None:
    self._inner.close()


def _absl_flags_usable() -> None:
  """grain 0.2.18's mp_prefetch reads an absl flag and raises UnparsedFlagAccessError outside an
  absl app (pytest, notebooks); google/grain#1355, fixed upstream by #1362. Mark flags parsed
  (defaults) in that case only, as the issue's workaround does."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_dir: str | os.PathLike, *, global_batch_size: int,
                        mesh: jax.sharding.Mesh | None, seed: int = 0, caption_ratio: float = 0.5,
                        workers: int = 0, read_threads: int = 2, prefetch: int = 2,
                        num_epochs: int | None = None, caption_dtype: Any = ml_dtypes.bfloat16,
                        rules: Rules = LOGICAL_RULES) -> TrainIterator:
  """The training iterator (module doc).

  Args:
    data_dir: a directory written by `prepare` (or `synthetic.write_synthetic_dataset`).
    global_batch_size: examples per step over all hosts; divisible by the mesh's batch axes.
    mesh: batches become global jax.Arrays sharded over its batch axes; None: host-local numpy.
    seed: shuffling / caption choice / latent noise seed (epoch e reshuffles with (seed, e)).
    caption_ratio: probability of the short caption when a record also has a long one.
    workers: grain multiprocessing prefetch workers (0: decode in this process's threads).
    read_threads / prefetch: grain ReadOptions (batches decoded in parallel / buffered).
    num_epochs: None repeats forever.
    caption_dtype: bfloat16 (default, lossless: embeddings are stored in bf16) or float32.
  """
  if not 0.0 <= caption_ratio <= 1.0:
    raise ValueError(f"caption_ratio must be in [0, 1], got {caption_ratio}")
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  index = load_index(data_dir)
  schedule = BucketSchedule(index.members, global_batch_size, seed)
  sharding = None if mesh is None else checked_batch_sharding(mesh, global_batch_size, rules)
  rows = host_rows(sharding, global_batch_size)
  load = LoadBatch(index, schedule, rows, caption_ratio=caption_ratio, caption_dtype=caption_dtype)
  steps = INFINITE_STEPS if num_epochs is None else num_epochs * schedule.steps_per_epoch
  ds = grain.MapDataset.range(steps).map(load).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  if workers:
    _absl_flags_usable()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  fingerprint = {"global_batch_size": global_batch_size, "seed": seed,
                 "num_records": int(index.manifest["num_records"]),
                 "steps_per_epoch": schedule.steps_per_epoch, "caption_ratio": caption_ratio}
  return TrainIterator(iter(ds), sharding=sharding, rows=rows, global_batch_size=global_batch_size,
                       fingerprint=fingerprint, steps_per_epoch=schedule.steps_per_epoch)
