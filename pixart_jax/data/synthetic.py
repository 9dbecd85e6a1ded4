"""Synthetic datasets with the real record structure (benchmarks, AOT checks, pipeline tests).

`write_synthetic_dataset` writes a directory exactly as `prepare` does (ArrayRecord shards, shard
indexes, manifest, null caption) with random bf16 latent moments and trimmed caption embeddings,
without any image or encoder. `random_batch` fills one abstract batch (from
`pipeline.abstract_batches`) with random numpy data.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import jax
import numpy as np

from pixart_jax.data import buckets as buckets_lib
from pixart_jax.data.prepare_lib import write_manifest
from pixart_jax.data.records import BF16, LatentRecord, ShardWriter


def write_synthetic_dataset(out_dir: str | os.PathLike, counts: Mapping[str, int], *,
                            table: str | Mapping[str, tuple[int, int]] = "1024",
                            text_dim: int = 4096, latent_channels: int = 4, downsample: int = 8,
                            scaling_factor: float = 0.13025, caption_tokens: tuple[int, int] = (8, 120),
                            long_caption_tokens: tuple[int, int] | None = (120, 300),
                            max_length: int = 300, shard_size: int = 256, seed: int = 0) -> dict:
  """Writes `counts[key]` random records for each bucket key of `table`; returns the manifest.

  caption_tokens / long_caption_tokens: inclusive ranges of the trimmed embedding lengths
  (long_caption_tokens None: no long captions). Records of all buckets are interleaved in a
  seeded random order across `shard_size`-record shards.
  """
  out_dir = os.fspath(out_dir)
  tbl = {k: (int(h), int(w)) for k, (h, w) in buckets_lib.get_table(table).items()}
  unknown = [k for k in counts if k not in tbl]
  if unknown:
    raise ValueError(f"bucket keys {unknown} are not in the table (keys: {list(tbl)})")
  for k, (h, w) in tbl.items():
    if k in counts and (h % downsample or w % downsample):
      raise ValueError(f"bucket {k} = {h}x{w} is not a multiple of downsample={downsample}")
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  order = np.concatenate([np.full(int(n), i) for i, n in enumerate(counts.values())]).astype(int)
  rng.shuffle(order)
  keys = list(counts)

  def emb(lo_hi):
    n = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
    return rng.standard_normal((n, text_dim), np.float32).astype(BF16)

  num_shards = math.ceil(len(order) / shard_size)
  for j in range(num_shards):
    w = ShardWriter(out_dir, j, source_range=(j * shard_size, min(len(order), (j + 1) * shard_size)))
    for i in range(j * shard_size, min(len(order), (j + 1) * shard_size)):
      key = keys[order[i]]
      h, wd = tbl[key]
      shape = (h // downsample, wd // downsample, latent_channels)
      has_long = long_caption_tokens is not None and rng.random() < 0.5
      w.write(LatentRecord(
          name=f"synthetic/{i:08d}", bucket=key, orig_size=(h, wd),
          mean=rng.standard_normal(shape, np.float32).astype(BF16),
          std=rng.uniform(0.01, 0.1, shape).astype(np.float32).astype(BF16),
          caption=f"synthetic caption {i}", caption_emb=emb(caption_tokens),
          long_caption=f"synthetic long caption {i}" if has_long else None,
          long_caption_emb=emb(long_caption_tokens) if has_long else None,
          meta={"synthetic_id": i}))
    w.commit()
  encoders = {"id": f"synthetic:seed{seed}", "text_dim": text_dim, "latent_channels": latent_channels,
              "downsample": downsample, "scaling_factor": float(scaling_factor)}
  null = rng.standard_normal((max_length, text_dim), np.float32)
  return write_manifest(out_dir, num_shards=num_shards, table=tbl,
                        table_name=table if isinstance(table, str) else None, encoders=encoders,
                        null_caption=null, extra={"source": "synthetic"})


def random_batch(abstract: Mapping[str, jax.ShapeDtypeStruct], seed: int = 0) -> dict[str, np.ndarray]:
  """Numpy data for one abstract batch: normal latents/captions, prefix masks, arange index."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, sds in abstract.items():
    if k == "mask":
      b, s = sds.shape
      lengths = rng.integers(1, s + 1, size=b)
      out[k] = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int32)
    elif k == "index":
      out[k] = np.arange(sds.shape[0], dtype=sds.dtype)
    else:
      out[k] = rng.standard_normal(sds.shape, np.float32).astype(sds.dtype)
  return out
