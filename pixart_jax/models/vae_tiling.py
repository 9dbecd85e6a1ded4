"""Tiled VAE decode/encode: 2K/4K images in bounded memory.

The input is cut into overlapping tiles of ONE fixed shape, `(min(tile, H), min(tile, W))`, so the jitted
decoder/encoder compiles once per tile shape, whatever the image size. Instead of zero-padding the edge
tiles (padding would feed fake content into GroupNorm statistics and attention), the last tile of a row or
column is shifted back so it ends exactly at the image border; its overlap with its neighbour is then larger
than `overlap`, which the blend below handles.

Blend: every output tile is multiplied by a separable weight window and accumulated, together with the
weights, into full-size float32 buffers; the result is `sum(w * tile) / sum(w)`. Along each axis the window
is 1 except for a linear ramp of length `overlap * scale` on every side that touches another tile
(`(i + 0.5) / R`, never zero). Two neighbours at the nominal stride therefore cross-fade linearly over their
whole overlap (the weights sum to 1 there), like diffusers' `blend_v`/`blend_h`, and the irregular last
overlap is still a proper weighted average. Sides on the image border get no ramp, so a single tile covering
the whole image reproduces the untiled result exactly.

Tiled and untiled results are NOT identical: each tile sees its own GroupNorm statistics and the mid-block
attention only sees the tile, and outputs within ~3 latent cells of a tile edge are corrupted by the
zero padding (the ramps, over an overlap of >= 8 latent cells, blend those away). Measured on the SDXL
layout with random weights (bench/results/vae.md): decode with latents N(0,1)/0.13025 differs by <= ~8% of
the output range at the max and ~0.5% on average; encode of a smooth image differs much more (~45% max,
~2% mean on the posterior mean) because tile-local GroupNorm statistics follow the tile's content. Prefer
untiled `encode` for dataset preparation; `encode_tiled` is for when memory leaves no choice.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.models.vae import AutoencoderKL


@functools.partial(jax.jit, static_argnums=0)
def _decode_tile(graphdef, state, z):
  return nnx.merge(graphdef, state).decode(z)


@functools.partial(jax.jit, static_argnums=0)
def _encode_tile(graphdef, state, x):
  return nnx.merge(graphdef, state).encode(x)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _crop(x, y0, x0, th: int, tw: int):
  """x: B H W C -> B th tw C at (y0, x0); traced offsets, so one compile per (input, tile) shape."""
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_slice(x, (zero, y0, x0, zero), (x.shape[0], th, tw, x.shape[3]))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(acc, wacc, tile, weight, y0, x0):
  """acc: B H W C, wacc: 1 H W 1 (float32); tile: B th tw C; weight: 1 th tw 1; (y0, x0) its corner."""
  th, tw = tile.shape[1:3]
  zero = jnp.zeros((), jnp.int32)
  cur = jax.lax.dynamic_slice(acc, (zero, y0, x0, zero), (acc.shape[0], th, tw, acc.shape[3]))
  acc = jax.lax.dynamic_update_slice(acc, cur + tile.astype(jnp.float32) * weight, (zero, y0, x0, zero))
  wcur = jax.lax.dynamic_slice(wacc, (zero, y0, x0, zero), (1, th, tw, 1))
  wacc = jax.lax.dynamic_update_slice(wacc, wcur + weight, (zero, y0, x0, zero))
  return acc, wacc


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of size `min(tile, length)` covering [0, length), stride `tile - overlap`."""
  t = min(tile, length)
  if t == length:
    return [0]
  return list(range(0, length - t, tile - overlap)) + [length - t]


def _ramp(n: int, ramp: int, lead: bool, trail: bool) -> np.ndarray:
  """1-D blend weights of length n: linear ramps of length `ramp` on the flagged sides, else 1."""
  i = np.arange(n, dtype=np.float32) + 0.5
  w = np.ones(n, np.float32)
  if ramp == 0:
    return w
  if lead:
    w = np.minimum(w, i / ramp)
  if trail:
    w = np.minimum(w, (n - i) / ramp)
  return w


def _run_tiled(apply, graphdef, state, x, *, tile: int, overlap: int, num: int, den: int, out_channels: int,
               out_dtype) -> jax.Array:
  """Tiles x (B H W C) with input tiles `tile`/`overlap`; output size is input size * num / den."""
  b, h, w, _ = x.shape
  ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
  th, tw = min(tile, h), min(tile, w)
  oth, otw = th * num // den, tw * num // den
  ramp = overlap * num // den
  acc = jnp.zeros((b, h * num // den, w * num // den, out_channels), jnp.float32)
  wacc = jnp.zeros((1,) + acc.shape[1:3] + (1,), jnp.float32)
  for y0 in ys:
    wy = _ramp(oth, ramp, y0 > 0, y0 + th < h)
    for x0 in xs:
      wx = _ramp(otw, ramp, x0 > 0, x0 + tw < w)
      out = apply(graphdef, state, _crop(x, jnp.int32(y0), jnp.int32(x0), th, tw))
      weight = jnp.asarray(np.outer(wy, wx)[None, :, :, None])
      acc, wacc = _accumulate(acc, wacc, out, weight, jnp.int32(y0 * num // den), jnp.int32(x0 * num // den))
  return (acc / wacc).astype(out_dtype)


def _check_tiles(tile: int, overlap: int, what: str):
  if tile < 1:
    raise ValueError(f"{what}: tile must be >= 1, got {tile}")
  if not 0 <= overlap < tile:
    raise ValueError(f"{what}: overlap must satisfy 0 <= overlap < tile, got overlap={overlap}, tile={tile}")


def decode_tiled(vae: AutoencoderKL, z: jax.Array, *, tile_latent: int = 64, overlap_latent: int = 16) -> jax.Array:
  """z: B h w C (UNSCALED latent) -> image B h*f w*f 3, decoded in overlapping latent tiles.

  `tile_latent` x `tile_latent` latent tiles (512 px for SDXL at the default) overlapping by
  `overlap_latent` latent cells; see the module docstring for the blend.
  """
  _check_tiles(tile_latent, overlap_latent, "decode_tiled")
  if z.ndim != 4 or z.shape[-1] != vae.config.latent_channels:
    raise ValueError(f"decode_tiled: expected z of shape (B, h, w, {vae.config.latent_channels}), got {z.shape}")
  graphdef, state = nnx.split(vae)
  return _run_tiled(_decode_tile, graphdef, state, z, tile=tile_latent, overlap=overlap_latent,
                    num=vae.config.downsample_factor, den=1, out_channels=vae.config.out_channels,
                    out_dtype=vae.dtype)


def encode_tiled(vae: AutoencoderKL, x: jax.Array, *, tile: int = 512, overlap: int = 128) -> jax.Array:
  """x: B H W 3 (in [-1, 1]) -> moments B H/f W/f 2C, encoded in overlapping pixel tiles.

  H, W, `tile` and `overlap` must be multiples of the downsample factor f (8 for SDXL).
  """
  f = vae.config.downsample_factor
  _check_tiles(tile, overlap, "encode_tiled")
  if x.ndim != 4 or x.shape[-1] != vae.config.in_channels:
    raise ValueError(f"encode_tiled: expected x of shape (B, H, W, {vae.config.in_channels}), got {x.shape}")
  for name, v in (("tile", tile), ("overlap", overlap), ("height", x.shape[1]), ("width", x.shape[2])):
    if v % f:
      raise ValueError(f"encode_tiled: {name}={v} must be a multiple of the downsample factor {f}")
  graphdef, state = nnx.split(vae)
  return _run_tiled(_encode_tile, graphdef, state, x, tile=tile, overlap=overlap, num=1, den=f,
                    out_channels=2 * vae.config.latent_channels, out_dtype=vae.dtype)
