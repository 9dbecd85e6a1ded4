"""How one sampling request is laid over the Pipeline's mesh: sequence parallelism and VAE tiling, by rule.

Axis legend: B batch (prompts), h w token grid of one image (latent / patch), R KV-compression ratio, s sequence
shards.

The rule (the `Pipeline` applies it to every call; `plan --what sample` can apply the same functions):
  * sequence parallelism: the batch is split over the mesh's `data` axis as far as it divides; devices of the
    `data` axis that the batch leaves idle (they would only repeat the same work) become `sequence` shards, so
    one image's tokens are split over them by grid rows (`parallel.context`; a grid whose rows do not split into
    s blocks of whole R x R KV-compression windows is padded with masked rows, `context.padded_rows`). Among the
    divisors s of the `data` size, the one with the least work per device wins (B / (data / s) / s images'
    worth of tokens when B splits over the remaining data / s devices, else B / s: the batch is then replicated
    over them; times the padded share of the grid), the smallest s on ties (fewer all-gathers). s = 1 (no
    sequence parallelism) when B already uses every `data` device or when the image has fewer than
    `SP_MIN_TOKENS` tokens (communication would cost more than it saves). A mesh that already has a `sequence`
    axis larger than 1 is used as given, and so is a mesh whose axes are not `parallel.mesh.MESH_AXES`. `fsdp`
    and `tensor` are never changed (they hold the parameters).
  * VAE tiling: the decode runs in overlapping `VAE_TILE_LATENT` latent tiles (overlap a quarter of a tile) when
    the sampled image is larger than `VAE_TILE_ABOVE_PX` pixels on a side (an untiled SDXL decoder at 4096 x 4096
    holds tens of GiB of activations), or larger than `SMALL_CHIP_TILE_ABOVE_PX` on a chip with less than
    `SMALL_CHIP_BYTES` of memory (`chips.device_memory`; a 16 GiB v5e, the Colab chip: the untiled 2048 x 2048
    decode peaks at 19.6 GiB there, the tiled one at 13.6 GiB, bench/results/tpu_verdicts.md); below that it is
    one jitted program.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from pixart_jax.parallel import context
from pixart_jax.parallel.mesh import MESH_AXES

SP_MIN_TOKENS = 4096  # 1024 x 1024 px at patch 2 (64 x 64 tokens)
VAE_TILE_ABOVE_PX = 2048
SMALL_CHIP_BYTES = 24 * 2**30  # chips below this (v5e: 16 GiB) tile above SMALL_CHIP_TILE_ABOVE_PX
SMALL_CHIP_TILE_ABOVE_PX = 1024
VAE_TILE_LATENT = 128  # 1024 px tiles for the SDXL VAE (factor 8)


@dataclasses.dataclass(frozen=True)
class SamplingLayout:
  """sequence: sequence shards per image (1: none). vae_tile_latent: latent tile side of the decode (None:
  untiled); overlap_latent: its overlap. sequence_parallel: self-attention runs sequence parallel
  (`parallel.context`; whenever sequence > 1)."""
  sequence: int = 1
  vae_tile_latent: int | None = None
  overlap_latent: int = 0
  sequence_parallel: bool | None = None

  def __post_init__(self):
    if self.sequence_parallel is None:
      object.__setattr__(self, "sequence_parallel", self.sequence > 1)


def sequence_shards(mesh_shape: Mapping[str, int], batch: int, grid: tuple[int, int], kv_ratios: Sequence[int],
                    *, min_tokens: int | None = None) -> int:
  """The number of sequence shards for `batch` images of an (h, w) token grid on a mesh of `mesh_shape`
  ({axis: size}), whose layers compress K/V by `kv_ratios` (1 = none); min_tokens: default `SP_MIN_TOKENS`.
  See the module docstring."""
  min_tokens = SP_MIN_TOKENS if min_tokens is None else min_tokens
  given = int(mesh_shape.get(context.SEQUENCE_AXIS, 1))
  if given > 1:
    return given
  h, w = grid
  data = int(mesh_shape.get("data", 1))
  if h * w < min_tokens or data <= 1 or batch % data == 0:
    return 1
  best, best_work = 1, float(batch)  # s = 1: a batch that does not split over `data` is replicated
  for s in range(2, data + 1):
    if data % s:
      continue
    rest = data // s
    padded = max(context.padded_rows(h, s, r) for r in set(kv_ratios) or {1}) / h
    work = (batch / rest if batch % rest == 0 else batch) / s * padded  # images' worth of tokens per device
    if work < best_work:
      best, best_work = s, work
  return best


def vae_tiling(height: int, width: int, *, tile_latent: int | None = None,
               device_bytes: float | None = None) -> tuple[int | None, int]:
  """(latent tile side or None, overlap) for decoding a `height` x `width` px sample on devices of `device_bytes`
  memory (None: unknown, no small-chip rule); `tile_latent` forces a tile size (overlap tile // 4)."""
  above = VAE_TILE_ABOVE_PX
  if device_bytes is not None and device_bytes < SMALL_CHIP_BYTES:
    above = SMALL_CHIP_TILE_ABOVE_PX
  tile = tile_latent or (VAE_TILE_LATENT if max(height, width) > above else None)
  return tile, (tile // 4 if tile else 0)


def choose(mesh: Mesh | None, batch: int, grid: tuple[int, int], kv_ratios: Sequence[int], height: int, width: int,
           *, sequence: int | None = None, vae_tile_latent: int | None = None,
           device_bytes: float | None = None) -> SamplingLayout:
  """The layout of one request: `batch` images sampled at `height` x `width` px (token `grid`). `sequence` forces
  the shard count (1: off; it must divide the mesh's `data` axis), `vae_tile_latent` the decode tile;
  device_bytes: memory per device (`chips.device_memory`) for the small-chip tiling rule."""
  tile, overlap = vae_tiling(height, width, tile_latent=vae_tile_latent, device_bytes=device_bytes)
  shape = dict(mesh.shape) if mesh is not None else {}
  if sequence is None:  # auto; a mesh not laid out as `make_mesh` does (other axis names) is used as given
    recut = mesh is not None and tuple(mesh.axis_names) == MESH_AXES
    given = mesh is not None and int(shape.get(context.SEQUENCE_AXIS, 1)) > 1
    s = sequence_shards(shape, batch, grid, kv_ratios) if recut or given else 1
  else:
    s = int(sequence)
    given = int(shape.get(context.SEQUENCE_AXIS, 1))
    if s < 1 or (given == 1 and s > 1 and int(shape.get("data", 1)) % s) or (given > 1 and s not in (1, given)):
      raise ValueError(f"sequence_shards={sequence} does not fit the mesh {shape or '(none)'}: it must be 1, the "
                       "mesh's sequence axis, or a divisor of its data axis")
  return SamplingLayout(sequence=s, vae_tile_latent=tile, overlap_latent=overlap, sequence_parallel=s > 1)


def sequence_mesh(mesh: Mesh, shards: int) -> Mesh:
  """`mesh` with its `data` axis split into (data / shards, shards) and the second factor moved to `sequence`
  (same devices, same axis types; `mesh` itself when it already has that many sequence shards)."""
  if int(mesh.shape.get(context.SEQUENCE_AXIS, 1)) == shards:
    return mesh
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(f"automatic sequence parallelism needs a mesh with axes {MESH_AXES} (parallel.mesh.make_mesh), "
                     f"got {mesh.axis_names}")
  d, f, t, s = mesh.devices.shape
  if s != 1 or d % shards:
    raise ValueError(f"cannot move {shards} sequence shards out of a mesh of shape {dict(mesh.shape)}")
  devices = np.asarray(mesh.devices).reshape(d // shards, shards, f, t).transpose(0, 2, 3, 1)
  return Mesh(devices, MESH_AXES, axis_types=mesh.axis_types)
