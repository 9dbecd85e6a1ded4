"""CLIP image preprocessing in JAX, as transformers' CLIPImageProcessor (PIL backend) does it.

CLIPImageProcessor (models/clip/image_processing_pil_clip.py with image_processing_backends.PilBackend and
image_transforms.py) on a uint8 RGB picture:

  1. resize so the shortest side is `shortest_edge` (the long side int(shortest_edge * long / short)), with
     Pillow's BICUBIC `Image.resize` on the 8-bit image;
  2. center crop to `crop_size` (top = (H - h) // 2, left = (W - w) // 2);
  3. rescale by 1/255 and normalize with the CLIP mean / std (float32).

Pillow's 8-bit resample (libImaging/Resample.c) is separable: a horizontal pass, rounding to uint8, then a
vertical pass, rounding again. Each output pixel is a normalized Keys cubic (a = -0.5) of the input pixels in
a window widened by the downscale factor (antialiasing); the normalized weights are rounded to 22-bit fixed
point. `pil_resize_matrix` rebuilds those weights in numpy and the passes run as two matrix products in
float32 with the same rounding and clipping, so the resized pixels equal Pillow's (to the rare float32 tie at
a half integer; see tests/test_clip.py for the measured difference).

Images are B H W 3, uint8 or float in [0, 1]; float images are rounded to the uint8 grid first (what saving
them as PNG and handing the file to the processor does). transformers' torchvision backend (used when
torchvision is installed) resizes float tensors with torch's antialiased bicubic instead, which differs from
Pillow by up to a few uint8 levels; this module follows the PIL backend.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CLIPImageConfig", "clip_preprocess", "pil_resize_matrix", "resized_size", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers.utils.constants
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3
_PRECISION_BITS = 32 - 8 - 2  # Resample.c


@dataclasses.dataclass(frozen=True)
class CLIPImageConfig:
  """The fields of a CLIPImageProcessor `preprocessor_config.json` that matter here."""
  shortest_edge: int | None = 224          # resize the short side to this (None: resize to `size` exactly)
  size: tuple[int, int] | None = None      # (height, width) when the processor resizes to a fixed size
  crop_size: tuple[int, int] = (224, 224)  # (height, width)
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  do_normalize: bool = True

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any]) -> "CLIPImageConfig":
    """From a `preprocessor_config.json` dict (fields it omits take CLIPImageProcessor's defaults)."""
    resample = cfg.get("resample", _PIL_BICUBIC)
    if resample != _PIL_BICUBIC:
      raise ValueError(f"preprocessor resample={resample!r} is not supported (only 3, PIL BICUBIC)")
    size, shortest, fixed = cfg.get("size", {"shortest_edge": 224}), None, None
    if isinstance(size, int):
      shortest = size
    elif isinstance(size, Mapping) and "shortest_edge" in size and "longest_edge" not in size:
      shortest = int(size["shortest_edge"])
    elif isinstance(size, Mapping) and {"height", "width"} <= set(size):
      fixed = (int(size["height"]), int(size["width"]))
    else:
      raise ValueError(f"preprocessor size={size!r} is not supported (an int, {{shortest_edge}} or {{height, width}})")
    crop = cfg.get("crop_size", {"height": 224, "width": 224})
    crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
    return cls(shortest_edge=shortest, size=fixed, crop_size=crop,
               image_mean=tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
               image_std=tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD)),
               rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
               **{k: bool(cfg.get(k, True)) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")})

  @classmethod
  def for_image_size(cls, image_size: int) -> "CLIPImageConfig":
    """The default processor of a CLIP vision tower with `image_size` (no preprocessor_config.json)."""
    return cls(shortest_edge=image_size, crop_size=(image_size, image_size))


def resized_size(height: int, width: int, cfg: CLIPImageConfig) -> tuple[int, int]:
  """(H, W) after the resize (transformers' get_resize_output_image_size with default_to_square=False)."""
  if not cfg.do_resize:
    return height, width
  if cfg.shortest_edge is None:
    return cfg.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def _bicubic(x: np.ndarray) -> np.ndarray:
  """Resample.c bicubic_filter (Keys, a = -0.5)."""
  a, x = -0.5, np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def pil_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of Pillow's 8-bit BICUBIC resample along one axis (precompute_coeffs +
  normalize_coeffs_8bpc): window `center +- 2 * max(in/out, 1)`, weights normalized to sum 1, then rounded to
  22-bit fixed point (the values are k / 2^22, exact in float32)."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)   # C casts truncate toward zero
    hi = min(int(center + support + 0.5), in_size)
    k = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
    total = k.sum()
    if total != 0.0:
      k = k / total
    fixed = k * (1 << _PRECISION_BITS)
    w[i, lo:hi] = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5))  # round half away from zero
  return (w / (1 << _PRECISION_BITS)).astype(np.float32)


def _pass(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """One Pillow pass along `axis` (1 = H, 2 = W) of B H W C values on the uint8 grid (float32)."""
  if x.shape[axis] == out_size:
    return x  # Pillow skips a pass that keeps the size
  m = jnp.asarray(pil_resize_matrix(x.shape[axis], out_size))
  spec = "oh,bhwc->bowc" if axis == 1 else "ow,bhwc->bhoc"
  y = jnp.einsum(spec, m, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(jnp.floor(y + 0.5), 0.0, 255.0)  # clip8: (sum + 2^21) >> 22, clamped to [0, 255]


def clip_preprocess(images: jax.Array, cfg: CLIPImageConfig) -> jax.Array:
  """images: B H W 3, uint8 or float in [0, 1] -> pixel_values B h w 3 float32 (h w = crop_size).

  jit-friendly: the resize weights depend only on the (static) shapes.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3) NHWC, got shape {images.shape}")
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = images.astype(jnp.float32)
  else:
    x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)  # onto the uint8 grid
  if cfg.do_resize:
    h, w = resized_size(x.shape[1], x.shape[2], cfg)
    x = _pass(_pass(x, 2, w), 1, h)  # horizontal first, as Pillow
  if cfg.do_center_crop:
    ch, cw = cfg.crop_size
    hh, ww = x.shape[1], x.shape[2]
    if ch > hh or cw > ww:  # transformers pads with zeros around the image
      pt, pl = math.ceil((max(ch, hh) - hh) / 2), math.ceil((max(cw, ww) - ww) / 2)
      x = jnp.pad(x, ((0, 0), (pt, max(ch, hh) - hh - pt), (pl, max(cw, ww) - ww - pl), (0, 0)))
      hh, ww = x.shape[1], x.shape[2]
    top, left = (hh - ch) // 2, (ww - cw) // 2
    x = x[:, top:top + ch, left:left + cw]
  if cfg.do_rescale:
    x = x * jnp.float32(cfg.rescale_factor)
  if cfg.do_normalize:
    x = (x - jnp.asarray(cfg.image_mean, jnp.float32)) / jnp.asarray(cfg.image_std, jnp.float32)
  return x
