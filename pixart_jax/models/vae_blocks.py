"""Building blocks of the SDXL-style AutoencoderKL (diffusers layout), NHWC, Flax NNX.

Attribute names mirror the diffusers modules (`norm1`, `conv1`, `conv_shortcut`, `group_norm`, `to_q`, ...)
so the weight key map in `pixart_jax.convert.vae_keys` stays a direct rename.

Logical axis names: conv kernels (kh, kw, I, O) -> (None, None, "conv_in", "conv_out"), conv biases
("conv_out",), norm scale/bias ("norm",). The attention projections are 1x1 channel mixes and use
("conv_in", "conv_out") too, so the default rules table replicates the whole VAE (84 M params).

Precision: GroupNorm statistics and the attention softmax run in float32 whatever the compute dtype.
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.parallel.sharding import param_init

_CONV_KERNEL = (None, None, "conv_in", "conv_out")
_CONV_BIAS = ("conv_out",)
_NORM = ("norm",)


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding="SAME",
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """An NHWC `nnx.Conv` with logical axis names on kernel (kh kw I O) and bias (O)."""
  return nnx.Conv(
      in_ch,
      out_ch,
      (kernel, kernel),
      strides=stride,
      padding=padding,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=param_init(nnx.initializers.lecun_normal(), _CONV_KERNEL),
      bias_init=param_init(nnx.initializers.zeros_init(), _CONV_BIAS),
      rngs=rngs,
  )


def linear(in_ch: int, out_ch: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A channel-mixing `nnx.Linear` (kernel I O) with logical axis names."""
  return nnx.Linear(
      in_ch,
      out_ch,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=param_init(nnx.initializers.lecun_normal(), ("conv_in", "conv_out")),
      bias_init=param_init(nnx.initializers.zeros_init(), _CONV_BIAS),
      rngs=rngs,
  )


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC (torch.nn.GroupNorm semantics); statistics in float32 (two-pass variance)."""

  def __init__(self, num_channels: int, num_groups: int, *, eps: float = 1e-6, dtype, param_dtype):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(param_init(nnx.initializers.ones_init(), _NORM)(None, (num_channels,), param_dtype))
    self.bias = nnx.Param(param_init(nnx.initializers.zeros_init(), _NORM)(None, (num_channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W C -> B H W C (in `dtype`)."""
    xf = einops.rearrange(x.astype(jnp.float32), "b h w (g c) -> b h w g c", g=self.num_groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    y = einops.rearrange((xf - mean) * jax.lax.rsqrt(var + self.eps), "b h w g c -> b h w (g c)")
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding: GN-SiLU-Conv3-GN-SiLU-Conv3 + (1x1) shortcut."""

  def __init__(self, in_ch: int, out_ch: int, *, groups: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(in_ch, groups, eps=eps, **kw)
    self.conv1 = conv(in_ch, out_ch, 3, padding=1, rngs=rngs, **kw)
    self.norm2 = GroupNorm(out_ch, groups, eps=eps, **kw)
    self.conv2 = conv(out_ch, out_ch, 3, padding=1, rngs=rngs, **kw)
    self.conv_shortcut = conv(in_ch, out_ch, 1, padding=0, rngs=rngs, **kw) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W Cin -> B H W Cout."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """Single-head self-attention over all H*W positions (diffusers VAE mid-block Attention).

  GroupNorm -> q/k/v Linear -> softmax(q k^T / sqrt(C)) v (fp32 logits and softmax) -> to_out -> + input.
  Queries are processed `query_chunk` rows at a time (lax.map), so the logits never exceed
  B x query_chunk x H*W (1024x1024 image: 16384 positions, 256 MiB per image in fp32 instead of 1 GiB).
  Rows are independent, so chunking does not change the result.
  """

  def __init__(self, channels: int, *, groups: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs,
               query_chunk: int | None = 4096):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.query_chunk = query_chunk
    self.group_norm = GroupNorm(channels, groups, eps=eps, **kw)
    self.to_q = linear(channels, channels, rngs=rngs, **kw)
    self.to_k = linear(channels, channels, rngs=rngs, **kw)
    self.to_v = linear(channels, channels, rngs=rngs, **kw)
    self.to_out = linear(channels, channels, rngs=rngs, **kw)
    self.scale = 1.0 / math.sqrt(channels)

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q: B Q C, k/v: B L C -> B Q C."""
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * self.scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkc->bqc", probs, v)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W C -> B H W C."""
    _, h, w, _ = x.shape
    t = einops.rearrange(self.group_norm(x), "b h w c -> b (h w) c")
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    n, chunk = q.shape[1], self.query_chunk
    if chunk is None or n <= chunk:
      o = self._attend(q, k, v)
    else:
      pad = -n % chunk
      qs = einops.rearrange(jnp.pad(q, ((0, 0), (0, pad), (0, 0))), "b (n q) c -> n b q c", q=chunk)
      o = jax.lax.map(lambda qc: self._attend(qc, k, v), qs)
      o = einops.rearrange(o, "n b q c -> b (n q) c")[:, :n]
    o = self.to_out(o)
    return x + einops.rearrange(o, "b (h w) c -> b h w c", h=h, w=w).astype(x.dtype)


class Downsample(nnx.Module):
  """Zero-pad bottom/right by 1, then Conv3x3 stride 2 with no padding (diffusers Downsample2D, padding=0)."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W C -> B ceil(H/2) ceil(W/2) C."""
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then Conv3x3 (diffusers Upsample2D with use_conv)."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W C -> B 2H 2W C."""
    return self.conv(einops.repeat(x, "b h w c -> b (h i) (w j) c", i=2, j=2))


class MidBlock(nnx.Module):
  """resnet -> (attention) -> resnet at constant width (diffusers UNetMidBlock2D, one layer)."""

  def __init__(self, channels: int, *, groups: int, eps: float, add_attention: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(groups=groups, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(channels, channels, **kw), ResnetBlock(channels, channels, **kw)])
    self.attention = Attention(channels, **kw) if add_attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W C -> B H W C."""
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):
  """`num_layers` resnets, then an optional Downsample (diffusers DownEncoderBlock2D)."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, add_downsample: bool, groups: int, eps: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=eps, **kw) for i in range(num_layers)
    ])
    self.downsampler = Downsample(out_ch, **kw) if add_downsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W Cin -> B H' W' Cout (H' = ceil(H/2) when downsampling)."""
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsampler is None else self.downsampler(x)


class UpBlock(nnx.Module):
  """`num_layers` resnets, then an optional Upsample (diffusers UpDecoderBlock2D)."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, add_upsample: bool, groups: int, eps: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=eps, **kw) for i in range(num_layers)
    ])
    self.upsampler = Upsample(out_ch, **kw) if add_upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W Cin -> B H' W' Cout (H' = 2H when upsampling)."""
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsampler is None else self.upsampler(x)
