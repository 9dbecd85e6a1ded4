"""Self-attention with optional KV token compression and qk-norm, and masked cross-attention.

Axis legend: B batch, L image tokens (h*w grid, row-major), S caption tokens, M compressed KV tokens,
D hidden width, N heads, K head dim.
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.layers import Dtype, dense, layer_norm
from pixart_jax.parallel.sharding import make_param

_MASK_VALUE = -1e30


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v with fp32 logits and softmax.

  q (B L N K), k v (B M N K), mask (B M) bool key mask (True = attend) or None -> (B L N K) in q's dtype.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("blnk,bmnk->bnlm", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bnlm,bmnk->blnk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


class KVCompress(nnx.Module):
  """Downsamples K and V on the 2-D token grid by R (spec section 3).

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

  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """x (B L D) on an (h, w) grid -> (B M D), M = out_grid(h, w)."""
    h, w = hw
    r = self.ratio
    grid = einops.rearrange(x, "b (h w) d -> b h w d", h=h, w=w)
    if self.mode == "uniform":
      return einops.rearrange(grid[:, ::r, ::r], "b h w d -> b (h w) d")
    hc, wc = h // r, w // r
    grid = grid[:, : hc * r, : wc * r]
    if self.mode == "ave":
      return einops.rearrange(grid[:, ::r, ::r], "b h w d -> b (h w) d")
    cells = einops.rearrange(grid, "b (h p) (w q) d -> b h w p q d", p=r, q=r)
    k = self.kernel[...].astype(self.dtype)[:, :, 0, :]  # (p, q, D)
    y = jnp.einsum("bhwpqd,pqd->bhwd", cells, k, preferred_element_type=jnp.float32).astype(self.dtype)
    y = y + self.bias[...].astype(self.dtype)
    y = einops.rearrange(y, "b h w d -> b (h w) d")
    return layer_norm(y, 1e-5, self.norm_scale[...], self.norm_bias[...])


class SelfAttention(nnx.Module):
  """PixArt self-attention (official `AttentionKVCompress`): q/k/v, optional qk-norm and KV compression."""

  def __init__(self, dim: int, num_heads: int, *, kv_ratio: int = 1, kv_mode: str = "conv", qk_norm: bool = False,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
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
    if self.compress is not None:
      k, v = self.compress(k, hw), self.compress(v, hw)
    split = lambda t: einops.rearrange(t, "b l (n k) -> b l n k", n=self.num_heads)
    o = dot_product_attention(split(q), split(k), split(v))
    return self.out(einops.rearrange(o, "b l n k -> b l (n k)"))


class CrossAttention(nnx.Module):
  """Image tokens attend to projected caption tokens under a key-padding mask (official `MultiHeadCrossAttention`)."""

  def __init__(self, dim: int, num_heads: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = dense(dim, dim, ("embed", "heads"), **kw)
    self.k = dense(dim, dim, ("embed", "heads"), **kw)
    self.v = dense(dim, dim, ("embed", "heads"), **kw)
    self.out = dense(dim, dim, ("heads", "embed"), zero=True, **kw)  # zero-init output projection

  def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B L D), y (B S D), mask (B S) bool -> (B L D)."""
    split = lambda t: einops.rearrange(t, "b l (n k) -> b l n k", n=self.num_heads)
    o = dot_product_attention(split(self.q(x)), split(self.k(y)), split(self.v(y)), mask)
    return self.out(einops.rearrange(o, "b l n k -> b l (n k)"))
