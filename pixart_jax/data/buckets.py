"""Aspect-ratio bucket tables, closest-bucket / resolution binning, and the cover-resize + center-crop.

Tables (`TABLES`, generated from the official PixArt-Sigma `diffusion/data/datasets/utils.py` by
scripts/extract_bucket_tables.py into `_tables.py`) map a key (h/w rounded, a string such as "0.57")
to a bucket (H, W) in pixels:

  name        official name            entries  base (square bucket)  use
  "256"       ASPECT_RATIO_256         40       256                   training (= 1024 table / 4)
  "512"       ASPECT_RATIO_512         40       512                   training (= 1024 table / 2)
  "1024"      ASPECT_RATIO_1024        40       1024                  training
  "2048"      ASPECT_RATIO_2048        40       2048                  training (= 1024 table x 2)
  "2880"      ASPECT_RATIO_2880        40       2880                  training (dims multiples of 64)
  "256_test"  ASPECT_RATIO_256_TEST    33       256                   inference
  "512_test"  ASPECT_RATIO_512_TEST    33       512                   inference
  "1024_test" ASPECT_RATIO_1024_TEST   33       1024                  inference
  "2048_test" ASPECT_RATIO_2048_TEST   33       2048                  inference
  "4096"      ASPECT_RATIO_2880_TEST   33       4096                  4K inference (despite its name)
Aliases: "2880_test" = "4096"; diffusers' resolution-binning tables "256_bin", "512_bin", "1024_bin"
(= the *_test tables) and "2048_bin" (= the 40-entry training table "2048"); our "4096_bin" = "4096".

Rules:
* `closest_bucket` is the official `get_closest_ratio`: the key minimising |float(key) - h/w|, the
  first such key in table order on ties. diffusers' `classify_height_width_bin` is the same rule and
  returns only (H, W).
* `resize_and_center_crop` is the official on-the-fly training transform (InternalDataMSSigma):
  scale so the image covers the bucket (the limiting side gets exactly the bucket size, the other
  `int(...)`), resize with PIL, then a torchvision-style center crop (offset round((excess) / 2)).
* `check_request(h, w, table)` accepts a requested size when its aspect ratio h/w lies within the
  table's key range ([0.25, 4] for every official table) and its pixel count within [1/4, 4] x the
  table's base**2 (base = the square bucket's side); anything else raises ValueError.
"""
from __future__ import annotations

import types
from typing import Mapping, Union

import numpy as np
from PIL import Image

from pixart_jax.data import _tables

__all__ = [
    "TABLES", "get_table", "base_resolution", "closest_bucket", "classify_height_width_bin",
    "check_request", "resize_and_center_crop", "train_resample", "training_table_for_image_size",
    "bin_table_for_sample_size",
]

Table = Mapping[str, tuple[int, int]]
TableLike = Union[str, Table]

_BY_NAME = {
    "256": _tables.ASPECT_RATIO_256,
    "512": _tables.ASPECT_RATIO_512,
    "1024": _tables.ASPECT_RATIO_1024,
    "2048": _tables.ASPECT_RATIO_2048,
    "2880": _tables.ASPECT_RATIO_2880,
    "256_test": _tables.ASPECT_RATIO_256_TEST,
    "512_test": _tables.ASPECT_RATIO_512_TEST,
    "1024_test": _tables.ASPECT_RATIO_1024_TEST,
    "2048_test": _tables.ASPECT_RATIO_2048_TEST,
    "4096": _tables.ASPECT_RATIO_2880_TEST,
    "2880_test": _tables.ASPECT_RATIO_2880_TEST,
    # diffusers' resolution-binning tables (PixArt pipelines) and our 4K choice.
    "256_bin": _tables.ASPECT_RATIO_256_TEST,
    "512_bin": _tables.ASPECT_RATIO_512_TEST,
    "1024_bin": _tables.ASPECT_RATIO_1024_TEST,
    "2048_bin": _tables.ASPECT_RATIO_2048,
    "4096_bin": _tables.ASPECT_RATIO_2880_TEST,
}

TABLES: Mapping[str, Table] = types.MappingProxyType(
    {name: types.MappingProxyType(dict(t)) for name, t in _BY_NAME.items()})

# diffusers PixArt pipelines: transformer.config.sample_size (latent side) -> binning table.
# 512 (a 4096-px model) is our addition: the official 4K inference table ASPECT_RATIO_2880_TEST.
_BIN_FOR_SAMPLE_SIZE = {32: "256_bin", 64: "512_bin", 128: "1024_bin", 256: "2048_bin",
                        512: "4096_bin"}

# Training table per model image size (official configs: 512-MS -> ASPECT_RATIO_512, 1024-MS ->
# ASPECT_RATIO_1024, 2K -> ASPECT_RATIO_2048; the official 256 config is single-scale, the 256 table
# is the multi-scale option). 2880 is the official ASPECT_RATIO_2880; 4096 is our choice (the 4K table).
_TRAIN_FOR_IMAGE_SIZE = {256: "256", 512: "512", 1024: "1024", 2048: "2048", 2880: "2880",
                         4096: "4096"}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def get_table(table: TableLike) -> Table:
  """A table by name (see module doc) or the mapping itself (validated non-empty)."""
  if isinstance(table, str):
    if table not in TABLES:
      raise ValueError(f"unknown bucket table {table!r}; known tables: {sorted(TABLES)}")
    return TABLES[table]
  if not isinstance(table, Mapping) or not table:
    raise ValueError(f"a bucket table must be a table name or a non-empty mapping, got {table!r}")
  return table


def base_resolution(table: TableLike) -> int:
  """Side of the table's square bucket (key "1.0"), e.g. 1024 for "1024"."""
  t = get_table(table)
  if "1.0" not in t or t["1.0"][0] != t["1.0"][1]:
    raise ValueError("bucket table has no square '1.0' bucket to define its base resolution")
  return int(t["1.0"][0])


def _check_size(height, width) -> None:
  for name, v in (("height", height), ("width", width)):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
      raise ValueError(f"{name} must be a positive number, got {v!r}")


def closest_bucket(height: float, width: float, table: TableLike) -> tuple[str, tuple[int, int]]:
  """The official `get_closest_ratio`: (key, (H, W)) of the key closest to height/width."""
  _check_size(height, width)
  t = get_table(table)
  aspect_ratio = height / width
  key = min(t.keys(), key=lambda ratio: abs(float(ratio) - aspect_ratio))
  h, w = t[key]
  return key, (int(h), int(w))


def classify_height_width_bin(height: int, width: int, table: TableLike) -> tuple[int, int]:
  """diffusers' `VaeImageProcessor.classify_height_width_bin`: the (H, W) bin for a requested size."""
  return closest_bucket(height, width, table)[1]


def check_request(height: int, width: int, table: TableLike) -> None:
  """Raises ValueError unless (height, width) is a size the table can serve (rule in module doc)."""
  _check_size(height, width)
  t = get_table(table)
  keys = [float(k) for k in t]
  lo, hi = min(keys), max(keys)
  ar = height / width
  if not lo <= ar <= hi:
    raise ValueError(
        f"requested {height}x{width} (HxW) has aspect ratio h/w = {ar:.4g}, outside the table's "
        f"range [{lo:g}, {hi:g}]")
  base = base_resolution(t)
  pixels = height * width
  if not base * base / 4 <= pixels <= base * base * 4:
    raise ValueError(
        f"requested {height}x{width} (HxW) = {pixels} pixels is too far from the table's base "
        f"resolution {base}x{base}: allowed [{base * base // 4}, {base * base * 4}] pixels")


def _resample(resample) -> Image.Resampling:
  if isinstance(resample, str):
    if resample.lower() not in _RESAMPLE:
      raise ValueError(f"unknown resample {resample!r}; use one of {sorted(_RESAMPLE)}")
    return _RESAMPLE[resample.lower()]
  if isinstance(resample, Image.Resampling):
    return resample
  raise ValueError(f"resample must be a name or PIL.Image.Resampling, got {resample!r}")


def train_resample(table: str) -> str:
  """Official training interpolation: LANCZOS for the 2048 and 2880 tables, else BICUBIC."""
  get_table(table)
  return "lanczos" if table in ("2048", "2880") else "bicubic"


def resize_and_center_crop(img: np.ndarray, height: int, width: int,
                           resample: str | Image.Resampling = "bicubic") -> np.ndarray:
  """Cover-resize then center-crop, as the official multi-scale training transform.

  Args:
    img: H W C uint8 (C = 1, 3 or 4) or H W uint8.
    height, width: the bucket size.
    resample: PIL filter name ("bicubic", "lanczos", "bilinear", ...).
  Returns:
    height W C uint8 (same channel layout as `img`), width = `width`.
  """
  img = np.asarray(img)
  bad_channels = img.ndim == 3 and img.shape[2] not in (1, 3, 4)
  if img.dtype != np.uint8 or img.ndim not in (2, 3) or bad_channels:
    raise ValueError(
        f"img must be an H W C uint8 array with C in (1, 3, 4), got shape {img.shape} {img.dtype}")
  for name, v in (("height", height), ("width", width)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  ori_h, ori_w = img.shape[:2]
  if ori_h == 0 or ori_w == 0:
    raise ValueError(f"img is empty: shape {img.shape}")
  if height / ori_h > width / ori_w:
    rh, rw = height, int(ori_w * height / ori_h)
  else:
    rh, rw = int(ori_h * width / ori_w), width
  rh, rw = max(rh, height), max(rw, width)  # float rounding never leaves a gap to pad
  squeeze = img.ndim == 3 and img.shape[2] == 1
  pil = Image.fromarray(img[..., 0] if squeeze else img)
  pil = pil.resize((rw, rh), resample=_resample(resample))
  top = int(round((rh - height) / 2.0))  # torchvision center_crop offsets
  left = int(round((rw - width) / 2.0))
  out = np.asarray(pil.crop((left, top, left + width, top + height)))
  return out[..., None] if squeeze else out


def training_table_for_image_size(image_size: int) -> str:
  """Training bucket table for a model trained at `image_size` pixels (module doc)."""
  if image_size not in _TRAIN_FOR_IMAGE_SIZE:
    raise ValueError(
        f"no training bucket table for image size {image_size}; known: {sorted(_TRAIN_FOR_IMAGE_SIZE)}")
  return _TRAIN_FOR_IMAGE_SIZE[image_size]


def bin_table_for_sample_size(sample_size: int) -> str:
  """Resolution-binning table for a transformer `sample_size` (latent side = image side / 8).

  32 -> "256_bin", 64 -> "512_bin", 128 -> "1024_bin", 256 -> "2048_bin" (as diffusers'
  PixArt-Sigma pipeline); 512 (a 4K model) -> "4096_bin", the official 4K inference table
  ASPECT_RATIO_2880_TEST (our choice; diffusers raises for it).
  """
  if sample_size not in _BIN_FOR_SAMPLE_SIZE:
    raise ValueError(
        f"no resolution-binning table for sample_size {sample_size}; known: "
        f"{sorted(_BIN_FOR_SAMPLE_SIZE)}")
  return _BIN_FOR_SAMPLE_SIZE[sample_size]


def binned_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
  """(H, W) a pipeline with transformer `sample_size` samples a height x width request at (resolution binning,
  `bin_table_for_sample_size`); the request is checked first (`check_request`). E.g. 3840x2160 -> 5376x3072 with a
  4K model (every bucket of a table has about the same area)."""
  table = bin_table_for_sample_size(sample_size)
  check_request(height, width, table)
  return classify_height_width_bin(height, width, table)
