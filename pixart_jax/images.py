"""Image utilities: uint8 conversion, contact sheets, PNGs with metadata."""
from __future__ import annotations

import json
import pathlib

import numpy as np


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, as diffusers' postprocess: round(clip(x / 2 + 0.5, 0, 1) * 255)."""
  x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
  return np.round(x * 255).astype(np.uint8)


def contact_sheet(images: np.ndarray, cols: int | None = None, gap: int = 0):
  """(N, H, W, 3) uint8 images of one size -> a PIL grid image, row-major, `gap` white pixels between cells.

  Size: (rows * H + (rows - 1) * gap) x (cols * W + (cols - 1) * gap); unused cells stay white."""
  from PIL import Image

  images = np.asarray(images)
  n, h, w, _ = images.shape
  if gap < 0:
    raise ValueError(f"contact_sheet: gap must be >= 0, got {gap}")
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  sheet = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    y, x = r * (h + gap), c * (w + gap)
    sheet[y:y + h, x:x + w] = img
  return Image.fromarray(sheet)


def save_png(image: np.ndarray, path: str | pathlib.Path, meta: dict) -> None:
  """Writes a PNG whose tEXt chunks hold `meta` (strings as is, other values as JSON)."""
  from PIL import Image
  from PIL.PngImagePlugin import PngInfo

  info = PngInfo()
  for k, v in meta.items():
    info.add_text(k, v if isinstance(v, str) else json.dumps(v))
  Image.fromarray(image).save(path, pnginfo=info)
