"""Control images for ControlNet training data: the built-in transforms and the per-example image.

`prepare` (PrepareOptions.control) stores one control latent per record, the VAE posterior mean of the control
image at the record's bucket size:
  "canny"   Canny edges of the (bucket-sized) training image, white on black (Canny 1986; the usual ControlNet
            edge condition): Gaussian smoothing, Sobel gradients, non-maximum suppression in 4 directions,
            hysteresis between a low and a high threshold (fractions of the strongest gradient);
  "blur"    a Gaussian-blurred copy of the training image (sigma `control_sigma` pixels);
  "image"   the example's own control image (`RawExample.control_image`, e.g. a manifest's `control` column),
            cover-resized and center-cropped to the bucket like the training image.
"""
from __future__ import annotations

import numpy as np

KINDS = ("canny", "blur", "image")


def check_kind(kind: str | None) -> None:
  if kind is not None and kind not in KINDS:
    raise ValueError(f"control must be one of {', '.join(KINDS)} (or None), got {kind!r}")


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """(H W 3) uint8 -> the same, Gaussian-blurred per channel (reflect padding)."""
  from scipy import ndimage

  out = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def canny(image: np.ndarray, *, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
  """(H W 3) uint8 -> (H W 3) uint8 edge map (255 on edges). low / high: hysteresis thresholds as fractions of
  the largest gradient magnitude."""
  from scipy import ndimage

  grey = image.astype(np.float32).mean(-1)
  smooth = ndimage.gaussian_filter(grey, sigma, mode="reflect")
  gx, gy = ndimage.sobel(smooth, axis=1), ndimage.sobel(smooth, axis=0)
  mag = np.hypot(gx, gy)
  if mag.max() <= 0:
    return np.zeros_like(image)
  angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
  sector = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4  # 0: horizontal gradient, 1: 45, 2: 90, 3: 135
  offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
  padded = np.pad(mag, 1)
  h, w = mag.shape
  keep = np.zeros_like(mag, bool)
  for s, (dy, dx) in offsets.items():
    a = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    b = padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    keep |= (sector == s) & (mag >= a) & (mag >= b)
  thin = np.where(keep, mag, 0.0)
  strong, weak = thin >= high * mag.max(), thin >= low * mag.max()
  labels, n = ndimage.label(weak, structure=np.ones((3, 3)))
  connected = np.zeros(n + 1, bool)
  connected[np.unique(labels[strong])] = True
  connected[0] = False
  edges = connected[labels]
  return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


def control_pixels(kind: str, pixels: np.ndarray, control_image=None, *, sigma: float = 1.0,
                   resample: str = "bicubic") -> np.ndarray:
  """The control image (H W 3 uint8) of one example: `pixels` is its bucket-sized training image;
  `control_image` its own control image (kind "image"), resized to the bucket. Raises SkipExample
  ("no_control") when kind is "image" and the example has none."""
  from pixart_jax.data import buckets, image_io

  if kind == "blur":
    return blur(pixels, sigma)
  if kind == "canny":
    return canny(pixels, sigma=sigma)
  if kind == "image":
    if control_image is None:
      raise image_io.SkipExample("no_control", "the example has no control image")
    img = image_io.decode_image(control_image)
    return buckets.resize_and_center_crop(img, pixels.shape[0], pixels.shape[1], resample)
  check_kind(kind)
  raise AssertionError(kind)
