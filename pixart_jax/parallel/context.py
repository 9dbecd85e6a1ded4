"""Sequence ("context") parallel self-attention over the `sequence` mesh axis, for 2K/4K token grids.

Axis legend: B batch, L = h*w image tokens (row-major), D width = N heads * K head dim, M (compressed) KV tokens,
s = size of the `sequence` axis.

Image tokens are split along grid rows: shard i holds rows [i*h/s, (i+1)*h/s) (a grid whose rows do not split into
s blocks of whole KV-compression windows is padded with masked rows, `padded_rows`). Everything token-wise in a
block follows the activation sharding (`activation_length -> sequence`); only self-attention needs the other
shards' keys/values. Inside `jax.shard_map` (manual over every mesh axis; batch over the `batch` rule's axes,
heads over `tensor` when they divide) each device

  1. compresses its LOCAL K and V (KV compression, R x R windows: with h/s a multiple of R no window
     straddles two shards, so local compression + concatenation equals global compression),
  2. all-gathers the compressed K/V over `sequence` (R^2 = 4x fewer bytes than gathering uncompressed K/V),
  3. attends its local queries to all keys with the configured backend (blockwise: tile by tile, so no
     shard ever holds its (L/s x M) logits).

Without compression step 1 is skipped and the full K/V are all-gathered (not a ring: simpler, one collective,
and K/V for one 4K sample and layer are 65536 x 1152 x 2 bytes = 151 MB in bf16 — affordable on v5p/v5e).
The all-gather's transpose is a reduce-scatter, so the whole thing is differentiable. Cross-attention needs
no collective (caption K/V are replicated), so it stays with the partitioner.
"""
from __future__ import annotations

from typing import Callable

import einops
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from pixart_jax.models.attention_backends import AttentionBackend, AttentionOptions, attend_local, resolve
from pixart_jax.parallel.sharding import batch_spec, dim_spec

SEQUENCE_AXIS = "sequence"
GATHER_SCOPE = "sequence_parallel_kv_all_gather"  # named scope of the K/V all-gathers (visible in HLO metadata)

# compress(x (B Lloc C), (hloc, w), params, channel_axis) -> (B Mloc C)
CompressFn = Callable[[jax.Array, tuple[int, int], tuple, "str | tuple[str, ...] | None"], jax.Array]


def sequence_shards() -> int:
  """Size of the enclosing mesh's `sequence` axis (1 outside a mesh, or when it is already manual)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  if dict(zip(mesh.axis_names, mesh.axis_types))[SEQUENCE_AXIS] == AxisType.Manual:
    return 1
  return int(mesh.shape[SEQUENCE_AXIS])


def padded_rows(h: int, shards: int, ratio: int) -> int:
  """Grid rows after padding `h` so that it splits into `shards` equal row blocks, each a multiple of the KV
  compression `ratio` (so no ratio x ratio window straddles two shards): the smallest multiple of shards * ratio
  >= h. Padded rows are masked out of the keys and cut from the output."""
  if h < 1 or shards < 1 or ratio < 1:
    raise ValueError(f"padded_rows: grid rows, shards and ratio must be >= 1, got {h}, {shards}, {ratio}")
  unit = shards * ratio
  return -(-h // unit) * unit


def sequence_parallel_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, hw: tuple[int, int], *,
                                     num_heads: int, opts: AttentionOptions, ratio: int = 1,
                                     compress: CompressFn | None = None, compress_params: tuple = (),
                                     compressed_rows: int | None = None) -> jax.Array:
  """Self-attention with tokens sharded over `sequence`. q k v (B L D) projected (qk-normed) tokens on the
  (h, w) grid -> (B L D) attention output before the output projection.

  compress: the KV compression applied per shard (None: no compression); compress_params: its arrays, each
  with the channel axis last (sharded like the heads); compressed_rows: rows of the WHOLE grid's compressed K/V
  (`KVCompress.out_grid`; default h // ratio).
  A grid whose rows do not split into s blocks of whole R x R windows is padded with zero rows to
  `padded_rows(h, s, R)`: the padded keys (and compressed windows that reach into the padding, which the
  unsharded compression drops too) are masked, the padded queries' outputs cut, so the result equals the
  unsharded layer on any grid.
  """
  mesh = jax.sharding.get_abstract_mesh()
  shards = sequence_shards()
  if shards <= 1:
    raise ValueError("sequence_parallel_self_attention needs an enclosing mesh (jax.set_mesh) with a "
                     f"'{SEQUENCE_AXIS}' axis of size > 1")
  h, w = hw
  b, l, d = q.shape
  if l != h * w:
    raise ValueError(f"{l} tokens do not match the {h}x{w} grid")
  r = ratio if compress is not None else 1
  # compressed: whole windows per shard (pad rows); uncompressed: any equal split of the tokens (pad tokens)
  rows = padded_rows(h, shards, r) if r > 1 else h
  total = rows * w if r > 1 else -(-(h * w) // shards) * shards
  if total > l:  # zeros at the end; their keys are masked below and their queries cut at the end
    q, k, v = (jnp.pad(t, ((0, 0), (0, total - l), (0, 0))) for t in (q, k, v))
  opts = resolve(opts, q.dtype)  # auto -> the concrete backend (check_vma below depends on it)
  head_dim = d // num_heads
  bspec = batch_spec(mesh, None, (b,))[0]
  hspec = dim_spec(mesh, ("tensor",), num_heads)
  x_spec = P(bspec, SEQUENCE_AXIS, hspec)
  p_specs = tuple(P(*([None] * (a.ndim - 1)), hspec) for a in compress_params)

  def local(q, k, v, params):
    if compress is not None:
      k = compress(k, (rows // shards, w), params, hspec)
      v = compress(v, (rows // shards, w), params, hspec)
    with jax.named_scope(GATHER_SCOPE):
      k = jax.lax.all_gather(k, SEQUENCE_AXIS, axis=1, tiled=True)
      v = jax.lax.all_gather(v, SEQUENCE_AXIS, axis=1, tiled=True)
    mask = None
    if total > l:  # the valid keys are a prefix of the gathered (row-major) sequence: the unpadded grid's
      valid = l
      if compress is not None:  # compressed rows whose windows lie in the unpadded grid
        valid = (h // r if compressed_rows is None else compressed_rows) * (k.shape[1] // (rows // r))
      mask = jnp.broadcast_to(jnp.arange(k.shape[1]) < valid, (k.shape[0], k.shape[1]))
    split = lambda t: einops.rearrange(t, "b l (n k) -> b l n k", k=head_dim)
    o = attend_local(split(q), split(k), split(v), mask, opts=opts)
    return einops.rearrange(o, "b l n k -> b l (n k)")

  free = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
  check_vma = opts.backend is not AttentionBackend.SPLASH  # pallas_call outputs carry no varying-axes type
  o = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, p_specs), out_specs=x_spec,
                    axis_names=free, check_vma=check_vma)(q, k, v, tuple(compress_params))
  return o[:, :l] if total > l else o
