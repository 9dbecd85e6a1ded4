"""Checks of user-given values (API arguments, config fields, flags): each raises one ValueError naming the input,
the value and what is valid. Library code calls them where a value enters (Pipeline, train config, ...), so the
command lines and the Python API refuse the same things with the same words."""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["positive", "non_negative", "finite", "seed", "strength", "image", "mask", "MAX_SEED"]

# jax.random.key keeps the low 32 bits of a seed (without x64): 2**32 and 0 are the same key, -1 and 2**32 - 1 too.
MAX_SEED = 2**32 - 1


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive(name: str, value, *, allow_none: bool = False):
  """`value` as an int if it is an integer >= 1 (or None when allowed); else ValueError naming `name`."""
  if value is None and allow_none:
    return value
  if not _is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
  return int(value)


def non_negative(name: str, value):
  """`value` as an int if it is an integer >= 0; else ValueError naming `name`."""
  if not _is_int(value) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
  return int(value)


def finite(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False):
  """`value` as a float if it is a finite real number in [low, high] ((low, high] with `low_open`); else ValueError
  naming `name`."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None and (value <= low if low_open else value < low):
    ok = False
  if ok and high is not None and value > high:
    ok = False
  if not ok:
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"<= {high:g}"
    rng = " and ".join(x for x in (lo, hi) if x)
    raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
  return float(value)


def seed(name: str, value):
  """`value` as an int if it is an integer in [0, 2**32 - 1] (distinct `jax.random.key`s); else ValueError."""
  if not _is_int(value) or not 0 <= value <= MAX_SEED:
    raise ValueError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}")
  return int(value)


def strength(name: str, value) -> float:
  """An image-to-image strength: a number in (0, 1] (1 = text-to-image); else ValueError naming `name`."""
  return finite(name, value, low=0.0, low_open=True, high=1.0)


def image(name: str, value, *, batch: int | None = None) -> np.ndarray:
  """An image or a batch of them -> (B H W 3) float32 in [-1, 1].

  Accepts (H W 3) / (B H W 3) uint8 (0..255), float arrays in [-1, 1], or a PIL image (converted to RGB).
  batch: the number of prompts; B must then be 1 or `batch`."""
  if hasattr(value, "convert") and hasattr(value, "size"):  # PIL
    value = np.asarray(value.convert("RGB"))
  try:
    x = np.asarray(value)
  except Exception:  # noqa: BLE001 - anything numpy cannot read is a bad value
    x = None
  if x is None or x.dtype.kind not in "uif" or x.ndim not in (3, 4) or x.shape[-1] != 3 or 0 in x.shape:
    raise ValueError(f"{name} must be an RGB image: (H W 3) or (B H W 3), uint8 0..255 or float in [-1, 1], or a "
                     f"PIL image; got {type(value).__name__} of shape {getattr(x, 'shape', None)}"
                     f"{'' if x is None else f' and dtype {x.dtype}'}")
  if x.ndim == 3:
    x = x[None]
  if batch is not None and x.shape[0] not in (1, batch):
    raise ValueError(f"{name} holds {x.shape[0]} images for {batch} prompts: give one image or one per prompt")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  if x.dtype.kind in "iu":
    raise ValueError(f"{name}: integer images must be uint8 (0..255), got {x.dtype}")
  x = x.astype(np.float32)
  if not np.isfinite(x).all() or x.min() < -1.0 or x.max() > 1.0:
    raise ValueError(f"{name}: float images must hold finite values in [-1, 1], got values in "
                     f"[{np.nanmin(x):g}, {np.nanmax(x):g}]")
  return x


def mask(name: str, value, batch: int, height: int, width: int) -> np.ndarray:
  """An inpainting mask in pixels (1 = repaint, 0 = keep) -> (B H W 1) float32 of 0 / 1 (binarised at 0.5).

  Accepts (H W), (H W 1), (B H W), (B H W 1) with B 1 or `batch`; values in [0, 1] (bool, uint8 0 / 1 or
  0 / 255, floats); a PIL image (its luminance, 0..255)."""
  if hasattr(value, "convert") and hasattr(value, "size"):  # PIL
    value = np.asarray(value.convert("L"))
  try:
    m = np.asarray(value)
  except Exception:  # noqa: BLE001
    m = None
  want = f"(H W), (H W 1), (B H W) or (B H W 1) with H W = {height} {width} (the image's size) and B 1 or {batch}"
  if m is None or m.dtype.kind not in "buif":
    raise ValueError(f"{name} must be a mask array {want}; got {type(value).__name__}")
  if m.ndim in (3, 4) and m.shape[-1] == 1:
    m = m[..., 0]
  if m.ndim == 2:
    m = m[None]
  if m.ndim != 3 or m.shape[1:] != (height, width) or m.shape[0] not in (1, batch):
    raise ValueError(f"{name} must have shape {want}; got {np.shape(value)}")
  if m.dtype == np.uint8 and m.max(initial=0) > 1:
    m = m / 255.0
  m = m.astype(np.float32)
  if not np.isfinite(m).all() or m.min() < 0.0 or m.max() > 1.0:
    raise ValueError(f"{name} must hold values in [0, 1] (1 = repaint, 0 = keep; uint8 0 / 255 also works), got "
                     f"values in [{np.nanmin(m):g}, {np.nanmax(m):g}]")
  return (m >= 0.5).astype(np.float32)[..., None]
