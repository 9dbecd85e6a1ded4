"""Patch embedding, 2-D sincos position embedding, timestep / size embedders, caption projection.

Axis legend: B batch, H W latent height/width, h w token grid, L = h*w tokens, S caption tokens,
D hidden width, Dc caption (T5) width.
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.models.layers import Dtype, Mlp, dense
from pixart_jax.parallel.sharding import make_param


# ----------------------------------------------------------------------------------------------------------------
# Position embedding (numpy float64, static shapes: computed at trace time)
# ----------------------------------------------------------------------------------------------------------------
def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim): [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/2))."""
  if dim % 2:
    raise ValueError(f"sincos dim must be even, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, h: int, w: int, base_size: int, interpolation_scale: float) -> np.ndarray:
  """2-D sincos PE for an (h, w) token grid, row-major: (h*w, dim) float64.

  Each axis is normalised by its own token count: coord = i / (n / base_size) / interpolation_scale.
  Channels [0, dim/2) encode the column (w) coordinate, [dim/2, dim) the row (h) coordinate (docs/ARCHITECTURE.md §2.4).
  """
  if dim % 4:
    raise ValueError(f"2-D sincos dim must be divisible by 4, got {dim}")
  gh = np.arange(h, dtype=np.float64) / (h / base_size) / interpolation_scale
  gw = np.arange(w, dtype=np.float64) / (w / base_size) / interpolation_scale
  col, row = np.meshgrid(gw, gh)  # (h, w) each; first output varies along w
  return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------------------------
def timestep_frequencies(half: int, max_period: float = 10000.0) -> np.ndarray:
  """(half,) float32 f_k = exp(-ln(max_period) k / half), computed as the official `t_embedder` and diffusers'
  `get_timestep_embedding` do: the exponent `-log(max_period) * arange(half, dtype=float32) / half` in float32 (a
  float64 exponent rounds differently and moves the arguments of large t, e.g. 999, by an ulp of their size);
  exp in float64, rounded (torch's float32 exp agrees on all but a few of 128 constants, by one ulp)."""
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """t (B,) float -> (B, dim) float32, cos first: [cos(t f_k), sin(t f_k)], f_k = `timestep_frequencies`."""
  half = dim // 2
  freqs = timestep_frequencies(half, max_period)
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nnx.Module):
  """sinusoid(256) -> Linear -> SiLU -> Linear (official `t_embedder`, diffusers `timestep_embedder`)."""

  def __init__(self, dim: int, *, freq_dim: int = 256, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    init = nnx.initializers.normal(0.02)
    self.linear_1 = dense(freq_dim, dim, (None, "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          kernel_init=init)
    self.linear_2 = dense(dim, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          kernel_init=init)

  def __call__(self, t: jax.Array) -> jax.Array:
    """t (B,) -> (B, dim)."""
    e = timestep_sinusoid(t, self.freq_dim).astype(self.linear_1.dtype)
    return self.linear_2(jax.nn.silu(self.linear_1(e)))


class MicroConditionEmbedder(nnx.Module):
  """PixArt-alpha csize / aspect-ratio embedders: each scalar -> sinusoid(256) -> MLP -> D/3; concat -> D."""

  def __init__(self, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.resolution = TimestepEmbedder(dim // 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.aspect_ratio = TimestepEmbedder(dim // 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, resolution: jax.Array, aspect_ratio: jax.Array) -> jax.Array:
    """resolution (B, 2) [h, w] pixels, aspect_ratio (B, 1) -> (B, D)."""
    b = resolution.shape[0]
    r = self.resolution(resolution.reshape(-1)).reshape(b, -1)
    a = self.aspect_ratio(aspect_ratio.reshape(-1)).reshape(b, -1)
    return jnp.concatenate([r, a], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Patch embedding and caption projection
# ----------------------------------------------------------------------------------------------------------------
class PatchEmbed(nnx.Module):
  """Conv2d(C -> D, kernel p, stride p) written as a matmul over (p q c) patches. Kernel (p, p, C, D)."""

  def __init__(self, patch: int, in_channels: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.patch = patch
    self.dtype = dtype
    fan_in, fan_out = patch * patch * in_channels, dim
    limit = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform on the (D, p*p*C) view, as the official init

    def kernel_init(key, shape, dt):
      return jax.random.uniform(key, shape, dt, -limit, limit)

    self.kernel = make_param(kernel_init, rngs.params(), (patch, patch, in_channels, dim), param_dtype,
                             (None, None, None, "embed"))
    self.bias = make_param(nnx.initializers.zeros_init(), rngs.params(), (dim,), param_dtype, ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, C) -> tokens (B, h*w, D), row-major over the (h, w) grid."""
    p = self.patch
    patches = einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p).astype(self.dtype)
    k = self.kernel[...].astype(self.dtype).reshape(-1, self.kernel.shape[-1])
    return jnp.einsum("blk,kd->bld", patches, k) + self.bias[...].astype(self.dtype)


class CaptionProjection(nnx.Module):
  """T5 features -> D: Linear -> GELU(tanh) -> Linear (official `y_embedder.y_proj`)."""

  def __init__(self, caption_dim: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.mlp = Mlp(caption_dim, dim, out_dim=dim, names=("caption_embed", "mlp"), out_name="embed", dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, y: jax.Array) -> jax.Array:
    """y (B, S, Dc) -> (B, S, D)."""
    return self.mlp(y)


def drop_captions(y: jax.Array, null_caption: jax.Array, drop: jax.Array) -> jax.Array:
  """Classifier-free-guidance dropout: rows of `drop` (B,) bool are replaced by `null_caption` (S, Dc).

  The caption mask is left unchanged (official `token_drop`): a dropped sample attends to the first L_i rows
  of the null embedding, where L_i is its own caption length.
  """
  return jnp.where(drop[:, None, None], null_caption[None].astype(y.dtype), y)
