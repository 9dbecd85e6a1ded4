"""Blockwise (flash-attention style) attention in plain JAX: the `blockwise` backend of
`models.attention_backends.attend`.

Axis legend: B batch, L query tokens, M key/value tokens, N heads, K head dim.

The FlashAttention-2 algorithm (Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", algorithms 1 and 2) with `lax.fori_loop`s: online softmax over key/value
tiles for one (batch row, head, query tile) at a time; a `jax.custom_vjp` saves only the output and the (B L N)
log-sum-exp and its backward recomputes each (block_q block_kv) probability tile. Logits, softmax statistics and
all accumulators are fp32. Ragged lengths are padded to the tiles internally and masked.

Loops (lax.fori_loop, never Python) over one (batch row, head, block) at a time, in the callers' B T N K layout
(no transposed copies of q/k/v): every step multiplies a (block_q K) query tile by a (block_kv K) key tile, so
the largest temporaries are a few (block_q block_kv) fp32 tiles. One head at a time keeps the tiles large
(large tiles run the CPU matmul near its peak) within a fixed memory bound; past ~16 MiB per tile the passes
over it (max, exp, p @ v) spill the cache and run slower (bench/results/blockwise_attention.md).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # logit of a masked key (finite: a fully masked row averages its values instead of NaN)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


_PAD_VALUE = 2 * MASK_VALUE  # padded keys: below every masked real key, so a fully masked row averages real keys


def _fit_block(length: int, block: int) -> tuple[int, int]:
  """(block, padded length): the fewest blocks of at most `block` tokens (a multiple of 8 when there are
  several), sized to waste as little padding as possible."""
  count = -(-length // block)
  if count == 1:
    return length, length
  size = round_up(-(-length // count), 8)
  return size, size * count


def _varying_axes(x: jax.Array) -> frozenset:
  """The shard_map axes `x` varies over (empty outside a shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _match_vma(x: jax.Array, *likes: jax.Array | None) -> jax.Array:
  """`x` (a fresh constant) typed as varying over every shard_map axis that any of `likes` varies over (a loop
  carry must have the type of what the loop computes from them)."""
  axes = frozenset().union(*(_varying_axes(a) for a in likes if a is not None))
  missing = tuple(sorted(axes - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _tile(x: jax.Array, b, start, h, size: int) -> jax.Array:
  """x (B T N K) -> the (size K) tile of batch row b, head h, tokens [start, start + size)."""
  return jax.lax.dynamic_slice(x, (b, start, h, 0), (1, size, 1, x.shape[-1])).reshape(size, x.shape[-1])


def _rows(x: jax.Array, b, start, h, size: int) -> jax.Array:
  """x (B T N) -> (size) for batch row b, head h."""
  return jax.lax.dynamic_slice(x, (b, start, h), (1, size, 1)).reshape(size)


def _put(buf: jax.Array, tile: jax.Array, b, start, h) -> jax.Array:
  """Writes a (size ...) tile back at (b, start, h) of a (B T N ...) buffer."""
  tile = tile.reshape(1, tile.shape[0], 1, *tile.shape[1:]).astype(buf.dtype)
  return jax.lax.dynamic_update_slice(buf, tile, (b, start, h) + (0,) * (buf.ndim - 3))


def _split_index(t, heads: int, blocks: int):
  """Flat loop index -> (batch row, head, block)."""
  return t // (heads * blocks), (t // blocks) % heads, t % blocks


def _scaled(x: jax.Array, scale: float) -> jax.Array:
  return (x.astype(jnp.float32) * scale).astype(x.dtype)


def _logits(qi, kj, bias, b, start, size):
  """qi (bq K) pre-scaled, kj (bk K), bias (B M) fp32 or None -> (bq bk) fp32 logits."""
  s = jnp.einsum("qk,mk->qm", qi, kj, preferred_element_type=jnp.float32)
  if bias is None:
    return s
  return s + jax.lax.dynamic_slice(bias, (b, start), (1, size))


def _blockwise_fwd_core(q, k, v, bias, block_q: int, block_kv: int):
  """q (B L N K), k v (B M N K) with L, M multiples of the blocks; bias (B M) fp32 or None ->
  (out (B L N K) in q's dtype, lse (B L N) fp32 log-sum-exp of the scaled logits)."""
  b_, lp, n, kd = q.shape
  nq, nk = lp // block_q, k.shape[1] // block_kv
  scale = 1.0 / math.sqrt(kd)
  width = round_up(kd + 1, 16) if kd % 16 else kd  # (p @ v) width: one spare lane column holds the row sum

  def q_tile(t, bufs):
    out, lse = bufs
    b, h, i = _split_index(t, n, nq)
    qi = _scaled(_tile(q, b, i * block_q, h, block_q), scale)

    def kv_step(j, carry):
      m, acc = carry
      s = _logits(qi, _tile(k, b, j * block_kv, h, block_kv), bias, b, j * block_kv, block_kv)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[:, None])
      vj = _tile(v, b, j * block_kv, h, block_kv)
      if width > kd:  # [v | 1 | 0...]: the same matmul also sums p (free in the last, partly used vector)
        vj = jnp.concatenate([vj, jnp.ones((block_kv, 1), vj.dtype), jnp.zeros((block_kv, width - kd - 1), vj.dtype)],
                             axis=1)
      pv = jnp.einsum("qm,mk->qk", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      if width == kd:
        pv = jnp.concatenate([pv, p.sum(axis=-1, keepdims=True)], axis=1)
      return m_new, acc * jnp.exp(m - m_new)[:, None] + pv

    init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q, max(width, kd + 1)), jnp.float32))
    m, acc = jax.lax.fori_loop(0, nk, kv_step, jax.tree.map(lambda c: _match_vma(c, q, k, v, bias), init))
    l = acc[:, kd]  # sum of p
    return (_put(out, acc[:, :kd] / l[:, None], b, i * block_q, h),
            _put(lse, m + jnp.log(l), b, i * block_q, h))

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b_, lp, n), jnp.float32))
  return jax.lax.fori_loop(0, b_ * n * nq, q_tile, jax.tree.map(lambda c: _match_vma(c, q, k, v, bias), init))


def _blockwise_bwd_core(q, k, v, bias, out, lse, dout, block_q: int, block_kv: int):
  """FlashAttention-2 backward: for each key/value tile, loops over the query tiles recomputing the (block_q
  block_kv) probabilities from the saved log-sum-exp. Shapes as `_blockwise_fwd_core`; dout like out ->
  (dq, dk, dv) in the inputs' dtypes."""
  b_, lp, n, kd = q.shape
  nq, nk = lp // block_q, k.shape[1] // block_kv
  scale = 1.0 / math.sqrt(kd)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B L N) rowsum(dO * O)
  everything = (q, k, v, bias, out, lse, dout)

  def kv_tile(t, bufs):
    dq, dk, dv = bufs
    b, h, j = _split_index(t, n, nk)
    kj, vj = _tile(k, b, j * block_kv, h, block_kv), _tile(v, b, j * block_kv, h, block_kv)

    # Tiles are kept transposed, (block_kv block_q): dV and dK are then plain (untransposed) matmuls, the
    # fast ones on the CPU; only dQ contracts over the leading axis.
    bj = None if bias is None else jax.lax.dynamic_slice(bias, (b, j * block_kv), (1, block_kv)).reshape(-1, 1)

    def q_step(i, carry):
      dq, dkj, dvj = carry
      qi, doi = _tile(q, b, i * block_q, h, block_q), _tile(dout, b, i * block_q, h, block_q)
      st = jnp.einsum("mk,qk->mq", kj, _scaled(qi, scale), preferred_element_type=jnp.float32)
      st = st if bj is None else st + bj
      pt = jnp.exp(st - _rows(lse, b, i * block_q, h, block_q)[None, :])                   # (bk bq)
      dvj = dvj + jnp.einsum("mq,qk->mk", pt.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
      dpt = jnp.einsum("mk,qk->mq", vj, doi, preferred_element_type=jnp.float32)
      dst = pt * (dpt - _rows(delta, b, i * block_q, h, block_q)[None, :])
      dkj = dkj + jnp.einsum("mq,qk->mk", dst.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
      dqi = jnp.einsum("mq,mk->qk", dst.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
      dq = _put(dq, _tile(dq, b, i * block_q, h, block_q) + dqi * scale, b, i * block_q, h)
      return dq, dkj, dvj

    zeros = _match_vma(jnp.zeros((block_kv, kd), jnp.float32), *everything)
    dq, dkj, dvj = jax.lax.fori_loop(0, nq, q_step, (dq, zeros, zeros))
    return dq, _put(dk, dkj * scale, b, j * block_kv, h), _put(dv, dvj, b, j * block_kv, h)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
  dq, dk, dv = jax.lax.fori_loop(0, b_ * n * nk, kv_tile, jax.tree.map(lambda c: _match_vma(c, *everything), init))
  return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_padded(q, k, v, bias, block_q, block_kv):
  return _blockwise_fwd_core(q, k, v, bias, block_q, block_kv)[0]


def _blockwise_padded_fwd(q, k, v, bias, block_q, block_kv):
  out, lse = _blockwise_fwd_core(q, k, v, bias, block_q, block_kv)
  return out, (q, k, v, bias, out, lse)  # besides the inputs only the output and the log-sum-exp (B L N)


def _blockwise_padded_bwd(block_q, block_kv, res, dout):
  q, k, v, bias, out, lse = res
  dq, dk, dv = _blockwise_bwd_core(q, k, v, bias, out, lse, dout, block_q, block_kv)
  return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)


_blockwise_padded.defvjp(_blockwise_padded_fwd, _blockwise_padded_bwd)


BLOCK_Q, BLOCK_KV = 4096, 1024  # default tiles: a 16 MiB fp32 tile (the fastest measured, see the module doc)


def blockwise_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                    block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV) -> jax.Array:
  """Blockwise attention: online softmax over key/value tiles, one (batch row, head, query tile) at a time, with
  a custom VJP that saves only the output and the log-sum-exp and recomputes the probabilities tile by tile
  (FlashAttention-2). Shapes and semantics as `dot_product_attention` (fp32 logits and softmax statistics).

  Ragged lengths are padded to the blocks: padded keys get logit bias 2 * -1e30 (masked keys -1e30), so they
  never contribute; padded queries are sliced off. Memory: the inputs, the output, (B L N) statistics and a few
  (block_q block_kv) fp32 tiles; the backward adds an fp32 dq accumulator.
  """
  b, l, n, kd = q.shape
  m = k.shape[1]
  bq, lp = _fit_block(l, block_q)
  bk, mp = _fit_block(m, block_kv)
  pad = lambda t, length: t if length == t.shape[1] else jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0), (0, 0)))
  bias = None
  if mask is not None or mp != m:
    valid = jnp.ones((b, m), bool) if mask is None else mask.astype(bool)
    bias = jnp.where(valid, 0.0, MASK_VALUE).astype(jnp.float32)
    bias = jnp.pad(bias, ((0, 0), (0, mp - m)), constant_values=_PAD_VALUE)
  # Inside a shard_map, type every operand as varying over the same axes: the transpose of that cast sums
  # dK / dV over the query shards that share replicated keys (the custom VJP's cotangents then type-check).
  q, k, v, bias = (None if a is None else _match_vma(a, q, k, v, bias) for a in (q, k, v, bias))
  out = _blockwise_padded(pad(q, lp), pad(k, mp), pad(v, mp), bias, bq, bk)
  return out if lp == l else out[:, :l]
