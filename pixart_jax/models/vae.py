"""AutoencoderKL (the SDXL VAE used by PixArt-Sigma) in Flax NNX, NHWC, images in [-1, 1].

Mirrors diffusers `AutoencoderKL` (autoencoder_kl.py / vae.py): `encode` returns the posterior moments
(mean and logvar concatenated on channels, like `latent_dist.parameters` moved to NHWC); `decode` takes the
UNSCALED latent. `encode_scaled` / `decode_scaled` apply `scaling_factor` (and `shift_factor`).
Tiled decoding/encoding for 2K/4K images lives in `pixart_jax.models.vae_tiling`; weights are loaded by
`pixart_jax.convert.vae_keys.load_vae`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.vae_blocks import DownBlock, GroupNorm, MidBlock, UpBlock, conv
from pixart_jax.parallel.sharding import constrain

_EPS = 1e-6  # diffusers hard-codes resnet/norm eps 1e-6 in the VAE Encoder/Decoder.
_ACTS = ("silu", "swish")

# diffusers config.json fields that carry no architecture (or are only hints) and are ignored, besides every
# private "_..." field (_class_name is checked, _diffusers_version, _name_or_path, _use_default_values, ...).
_IGNORED_HF_FIELDS = frozenset({"sample_size"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of a diffusers-layout AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D, SiLU)."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # encoder resnets per block; the decoder uses layers_per_block + 1
  norm_num_groups: int = 32
  scaling_factor: float = 0.13025
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = False  # hint only (diffusers decodes in fp32 when true); not used by the model

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must not be empty")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
            f"VAEConfig: block_out_channels {self.block_out_channels} must be divisible by "
            f"norm_num_groups={self.norm_num_groups}")
    if self.layers_per_block < 1:
      raise ValueError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}")

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent cell along each side (8 for SDXL)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def sdxl(cls) -> "VAEConfig":
    """The SDXL VAE (PixArt-Sigma's `vae/`, fp16-fix variant: force_upcast false)."""
    return cls()

  @classmethod
  def tiny(cls) -> "VAEConfig":
    """A tiny 4-level VAE (downsample factor 8) for tests."""
    return cls(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
    """Reads a diffusers `vae/config.json` dict; raises ValueError naming any unsupported field value.

    Missing fields take diffusers' `AutoencoderKL.__init__` defaults.
    """
    cfg = dict(cfg)
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"VAE config: _class_name={name!r} is not supported (only 'AutoencoderKL')")
    boc = tuple(cfg.get("block_out_channels", (64,)))
    for field, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = tuple(cfg.get(field, (expected,)))
      bad = [t for t in types if t != expected]
      if bad:
        raise ValueError(f"VAE config: {field} contains unsupported block type(s) {bad} (only {expected!r})")
      if len(types) != len(boc):
        raise ValueError(f"VAE config: {field} has {len(types)} entries but block_out_channels has {len(boc)}")
    act = cfg.get("act_fn", "silu")
    if act not in _ACTS:
      raise ValueError(f"VAE config: act_fn={act!r} is not supported (only 'silu')")
    for field in ("latents_mean", "latents_std"):
      if cfg.get(field) is not None:
        raise ValueError(f"VAE config: {field}={cfg[field]!r} is not supported (expected null)")
    known = {f.name for f in dataclasses.fields(cls)} | {
        "down_block_types", "up_block_types", "act_fn", "latents_mean", "latents_std"} | _IGNORED_HF_FIELDS
    unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
    if unknown:
      raise ValueError(f"VAE config: unsupported field(s) {unknown}")
    return cls(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        block_out_channels=boc,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=None if cfg.get("shift_factor") is None else float(cfg["shift_factor"]),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        force_upcast=bool(cfg.get("force_upcast", True)),
    )


class Encoder(nnx.Module):
  """Image -> 2*latent_channels (diffusers Encoder with double_z)."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    boc, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv(cfg.in_channels, boc[0], 3, padding=1, rngs=rngs, **kw)
    self.down_blocks = nnx.List([
        DownBlock(boc[max(i - 1, 0)], c, num_layers=cfg.layers_per_block, add_downsample=i < len(boc) - 1,
                  groups=g, eps=_EPS, rngs=rngs, **kw) for i, c in enumerate(boc)
    ])
    self.mid_block = MidBlock(boc[-1], groups=g, eps=_EPS, add_attention=cfg.mid_block_add_attention,
                              rngs=rngs, **kw)
    self.conv_norm_out = GroupNorm(boc[-1], g, eps=_EPS, **kw)
    self.conv_out = conv(boc[-1], 2 * cfg.latent_channels, 3, padding=1, rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W Cin -> B H/f W/f 2*C."""
    h = self.conv_in(x)
    for block in self.down_blocks:
      h = block(h)
    h = self.mid_block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  """latent_channels -> image (diffusers Decoder, group norm)."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    rev, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
    self.conv_in = conv(cfg.latent_channels, rev[0], 3, padding=1, rngs=rngs, **kw)
    self.mid_block = MidBlock(rev[0], groups=g, eps=_EPS, add_attention=cfg.mid_block_add_attention,
                              rngs=rngs, **kw)
    self.up_blocks = nnx.List([
        UpBlock(rev[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1, add_upsample=i < len(rev) - 1,
                groups=g, eps=_EPS, rngs=rngs, **kw) for i, c in enumerate(rev)
    ])
    self.conv_norm_out = GroupNorm(rev[-1], g, eps=_EPS, **kw)
    self.conv_out = conv(rev[-1], cfg.out_channels, 3, padding=1, rngs=rngs, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    """z: B h w C -> B h*f w*f Cout."""
    h = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      h = block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder. NHWC; images in [-1, 1]; latents unscaled unless a method says `_scaled`."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = config.latent_channels
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = conv(2 * c, 2 * c, 1, padding=0, **kw) if config.use_quant_conv else None
    self.post_quant_conv = conv(c, c, 1, padding=0, **kw) if config.use_post_quant_conv else None

  def _check(self, x: jax.Array, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what}: expected NHWC input (B, H, W, {channels}), got shape {x.shape}")

  def encode(self, x: jax.Array) -> jax.Array:
    """x: B H W in_channels (in [-1, 1]) -> moments B H/f W/f 2*C ([mean, logvar] on channels)."""
    self._check(x, self.config.in_channels, "encode")
    x = constrain(x.astype(self.dtype), ("batch", None, None, None))
    h = self.encoder(x)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    return constrain(h, ("batch", None, None, None))

  def decode(self, z: jax.Array) -> jax.Array:
    """z: B h w C (UNSCALED latent) -> image B h*f w*f out_channels (roughly [-1, 1])."""
    self._check(z, self.config.latent_channels, "decode")
    z = constrain(z.astype(self.dtype), ("batch", None, None, None))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return constrain(self.decoder(z), ("batch", None, None, None))

  def scale_latent(self, z: jax.Array) -> jax.Array:
    """Unscaled -> diffusion-space latent: (z - shift) * scaling_factor."""
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def unscale_latent(self, z: jax.Array) -> jax.Array:
    """Diffusion-space -> unscaled latent: z / scaling_factor + shift."""
    shift = self.config.shift_factor or 0.0
    return z / self.config.scaling_factor + shift

  def encode_scaled(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """x: B H W 3 -> diffusion-space latent B H/f W/f C: the posterior mean, or a sample when `rng` is given."""
    return self.scale_latent(sample_latent(self.encode(x), rng))

  def decode_scaled(self, z: jax.Array) -> jax.Array:
    """z: B h w C diffusion-space latent -> image B h*f w*f 3."""
    return self.decode(self.unscale_latent(z))


def moments_to_mean_std(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """moments: ... 2C -> (mean, std), each ... C, float32; logvar clamped to [-30, 20] like diffusers."""
  moments = moments.astype(jnp.float32)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))


def sample_latent(moments: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """moments: ... 2C -> unscaled latent ... C (float32): mean if `rng` is None, else mean + std * N(0, 1)."""
  mean, std = moments_to_mean_std(moments)
  if rng is None:
    return mean
  return mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
