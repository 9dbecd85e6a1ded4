"""Self-attention with optional KV token compression and qk-norm, and masked cross-attention.

Axis legend: B batch, L image tokens (h*w grid, row-major), S caption tokens, M compressed KV tokens,
D hidden width, N heads, K head dim.

How attention runs (auto / xla / blockwise / splash / cudnn, sequence parallelism) is an `AttentionOptions` value
given at construction (default: auto, no sequence parallelism); it never changes the parameters.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.attention_backends import AUTO_OPTIONS, AttentionOptions, attend, dot_product_attention
from pixart_jax.models.layers import Dtype, dense, layer_norm
from pixart_jax.parallel import context
from pixart_jax.parallel.sharding import make_param

__all__ = ["dot_product_attention", "compress_kv_tokens", "KVCompress", "SelfAttention", "CrossAttention"]


def _layer_norm_channel_sharded(y: jax.Array, eps: float, scale: jax.Array, bias: jax.Array, axis) -> jax.Array:
  """LayerNorm over channels split across mesh `axis` inside a shard_map (fp32 statistics by psum)."""
  yf = y.astype(jnp.float32)
  n = jax.lax.psum(y.shape[-1], axis)
  mean = jax.lax.psum(jnp.sum(yf, axis=-1, keepdims=True), axis) / n
  var = jax.lax.psum(jnp.sum(jnp.square(yf - mean), axis=-1, keepdims=True), axis) / n
  out = (yf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return out.astype(y.dtype)


def compress_kv_tokens(x: jax.Array, hw: tuple[int, int], ratio: int, mode: str, params: tuple = (), *,
                       dtype: Dtype, channel_axis=None) -> jax.Array:
  """KV compression as a pure function (see `KVCompress`). x (B L C) on an (h, w) grid -> (B M C).

  params (conv only): kernel (R R C), bias (C), norm_scale (C), norm_bias (C). channel_axis: mesh axis the C
  channels are split over inside a shard_map (the LayerNorm then reduces across it), or None.
  """
  h, w = hw
  r = ratio
  grid = einops.rearrange(x, "b (h w) d -> b h w d", h=h, w=w)
  if mode == "uniform":
    return einops.rearrange(grid[:, ::r, ::r], "b h w d -> b (h w) d")
  hc, wc = h // r, w // r
  grid = grid[:, : hc * r, : wc * r]
  if mode == "ave":
    return einops.rearrange(grid[:, ::r, ::r], "b h w d -> b (h w) d")
  kernel, bias, norm_scale, norm_bias = params
  cells = einops.rearrange(grid, "b (h p) (w q) d -> b h w p q d", p=r, q=r)
  y = jnp.einsum("bhwpqd,pqd->bhwd", cells, kernel.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
  y = y + bias.astype(dtype)
  y = einops.rearrange(y, "b h w d -> b (h w) d")
  if channel_axis is None:
    return layer_norm(y, 1e-5, norm_scale, norm_bias)
  return _layer_norm_channel_sharded(y, 1e-5, norm_scale, norm_bias, channel_axis)


class KVCompress(nnx.Module):
  """Downsamples K and V on the 2-D token grid by R (docs/ARCHITECTURE.md §3).

  conv:    depthwise R x R stride-R conv (+ LayerNorm eps 1e-5, affine), ONE module shared by K and V,
           initialised to the exact R x R average (weight 1/R^2, bias 0) so an uncompressed checkpoint
           fine-tunes from there.
  ave:     the official 'ave' = nearest-neighbour downsampling = top-left token of each R x R cell.
  uniform: strided slice [::R, ::R].
  Odd grids: conv and ave keep floor(h/R) x floor(w/R) cells and drop the trailing row/column (the official
  behaviour); uniform keeps ceil(h/R) x ceil(w/R) (the official code would fail on its reshape there).
  """

  def __init__(self, dim: int, ratio: int, mode: str, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.ratio, self.mode, self.dtype = ratio, mode, dtype
    if mode == "conv":
      r = ratio
      self.kernel = make_param(nnx.initializers.constant(1.0 / (r * r)), rngs.params(), (r, r, 1, dim), param_dtype,
                               (None, None, None, "embed"))
      self.bias = make_param(nnx.initializers.zeros_init(), rngs.params(), (dim,), param_dtype, ("embed",))
      self.norm_scale = make_param(nnx.initializers.ones_init(), rngs.params(), (dim,), param_dtype, ("norm",))
      self.norm_bias = make_param(nnx.initializers.zeros_init(), rngs.params(), (dim,), param_dtype, ("norm",))

  @staticmethod
  def out_grid(h: int, w: int, ratio: int, mode: str) -> tuple[int, int]:
    if mode == "uniform":
      return -(-h // ratio), -(-w // ratio)
    return h // ratio, w // ratio

  def params(self) -> tuple:
    """(kernel (R R D), bias (D), norm_scale (D), norm_bias (D)) for conv; () otherwise."""
    if self.mode != "conv":
      return ()
    return (self.kernel[...][:, :, 0, :], self.bias[...], self.norm_scale[...], self.norm_bias[...])

  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """x (B L D) on an (h, w) grid -> (B M D), M = out_grid(h, w)."""
    return compress_kv_tokens(x, hw, self.ratio, self.mode, self.params(), dtype=self.dtype)


class SelfAttention(nnx.Module):
  """PixArt self-attention (official `AttentionKVCompress`): q/k/v, optional qk-norm and KV compression."""

  def __init__(self, dim: int, num_heads: int, *, kv_ratio: int = 1, kv_mode: str = "conv", qk_norm: bool = False,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, opts: AttentionOptions = AUTO_OPTIONS):
    self.num_heads, self.opts, self.dtype = num_heads, opts, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = dense(dim, dim, ("embed", "heads"), **kw)
    self.k = dense(dim, dim, ("embed", "heads"), **kw)
    self.v = dense(dim, dim, ("embed", "heads"), **kw)
    self.out = dense(dim, dim, ("heads", "embed"), **kw)
    self.qk_norm = qk_norm
    if qk_norm:  # official: nn.LayerNorm(dim) over the full width, eps 1e-5, affine
      ones, zeros = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
      self.q_norm_scale = make_param(ones, rngs.params(), (dim,), param_dtype, ("norm",))
      self.q_norm_bias = make_param(zeros, rngs.params(), (dim,), param_dtype, ("norm",))
      self.k_norm_scale = make_param(ones, rngs.params(), (dim,), param_dtype, ("norm",))
      self.k_norm_bias = make_param(zeros, rngs.params(), (dim,), param_dtype, ("norm",))
    self.kv_ratio = kv_ratio
    self.compress = KVCompress(dim, kv_ratio, kv_mode, **kw) if kv_ratio > 1 else None

  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """x (B L D) on the (h, w) token grid -> (B L D)."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.qk_norm:
      q = layer_norm(q, 1e-5, self.q_norm_scale[...], self.q_norm_bias[...])
      k = layer_norm(k, 1e-5, self.k_norm_scale[...], self.k_norm_bias[...])
    if self.opts.sequence_parallel and context.sequence_shards() > 1:
      comp = self.compress
      fn = None if comp is None else (
          lambda t, grid, p, axis: compress_kv_tokens(t, grid, comp.ratio, comp.mode, p, dtype=self.dtype,
                                                      channel_axis=axis))
      o = context.sequence_parallel_self_attention(q, k, v, hw, num_heads=self.num_heads, opts=self.opts,
                                                   ratio=self.kv_ratio, compress=fn,
                                                   compress_params=() if comp is None else comp.params(),
                                                   compressed_rows=None if comp is None else
                                                   KVCompress.out_grid(*hw, comp.ratio, comp.mode)[0])
      return self.out(o)
    if self.compress is not None:
      k, v = self.compress(k, hw), self.compress(v, hw)
    split = lambda t: einops.rearrange(t, "b l (n k) -> b l n k", n=self.num_heads)
    o = attend(split(q), split(k), split(v), opts=self.opts)
    return self.out(einops.rearrange(o, "b l n k -> b l (n k)"))


class CrossAttention(nnx.Module):
  """Image tokens attend to projected caption tokens under a key-padding mask (official `MultiHeadCrossAttention`)."""

  def __init__(self, dim: int, num_heads: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
               opts: AttentionOptions = AUTO_OPTIONS):
    self.num_heads, self.opts = num_heads, opts
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = dense(dim, dim, ("embed", "heads"), **kw)
    self.k = dense(dim, dim, ("embed", "heads"), **kw)
    self.v = dense(dim, dim, ("embed", "heads"), **kw)
    self.out = dense(dim, dim, ("heads", "embed"), zero=True, **kw)  # zero-init output projection

  def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B L D), y (B S D), mask (B S) bool -> (B L D)."""
    split = lambda t: einops.rearrange(t, "b l (n k) -> b l n k", n=self.num_heads)
    o = attend(split(self.q(x)), split(self.k(y)), split(self.v(y)), mask, opts=self.opts)
    return self.out(einops.rearrange(o, "b l n k -> b l (n k)"))
