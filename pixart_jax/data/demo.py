"""The demo's dataset: scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside the package) as
8x8 RGB images, each with captions that name the digit in several phrasings.

Importing this module registers the source "demo:digits" for `prepare`.
"""
from __future__ import annotations

import numpy as np

from pixart_jax.data.sources import RawExample, register_source

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {w}",
    "the number {d}",
    "digit {w}",
    "the numeral {w}, handwritten",
)
IMAGE_SIZE = 8  # pixels: the scans at their native size (grey levels 0..16 -> 0..255, grey as RGB)


def caption(digit: int, variant: int) -> str:
  return TEMPLATES[variant % len(TEMPLATES)].format(w=WORDS[digit], d=digit)


def all_captions() -> list[str]:
  return [caption(d, v) for d in range(10) for v in range(len(TEMPLATES))]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 8, 8) float in [0, 16], labels (N,) int) — the real data, offline."""
  from sklearn.datasets import load_digits as _load

  d = _load()
  return d.images.astype(np.float32), d.target.astype(np.int64)


def to_rgb(images: np.ndarray) -> np.ndarray:
  """(N, 8, 8) in [0, 16] -> (N, 8, 8, 3) uint8 (ink is bright)."""
  x = np.clip(np.round(images / 16.0 * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(x[..., None], 3, axis=-1)


def from_rgb(images: np.ndarray) -> np.ndarray:
  """(N, 8, 8, 3) images in [-1, 1] -> (N, 64) features in [0, 16] (the classifier's input space)."""
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {x.shape}")
  x = (x.mean(-1) + 1.0) / 2.0 * 16.0
  return np.clip(x, 0, 16).reshape(len(x), IMAGE_SIZE * IMAGE_SIZE)


class DigitsSource:
  """N examples: 8x8 RGB uint8 digit images; caption and long caption name the digit."""

  def __init__(self):
    images, self.labels = load_digits()
    self.images = to_rgb(images)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> RawExample:
    d = int(self.labels[i])
    return RawExample(name=f"digit_{i:04d}", image=self.images[i], caption=caption(d, i),
                      long_caption=caption(d, i + 3), meta={"label": d})


register_source("demo:digits", DigitsSource)
