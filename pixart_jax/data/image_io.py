"""Robust image decoding for `prepare`: every failure becomes a `SkipExample` with a reason code.

Reason codes (the `reason` of a skip; `detail` carries the specific message):

  unreadable      the file could not be read (missing, permission, I/O error)
  not_a_file      the path is not a regular file (a FIFO, a device such as /dev/zero, a socket, a folder);
                  such paths are never read (a FIFO would block forever, a device never ends)
  empty_file      zero bytes
  not_an_image    the bytes are not in any image format PIL knows (e.g. a text file named .png)
  corrupt         a known format whose data fails to decode (truncated JPEG, bad PNG chunk, ...)
  too_large       more bytes than `max_bytes` (DEFAULT_MAX_IMAGE_BYTES = 256 MiB unless set), or more pixels
                  than PIL's decompression-bomb limit
  too_small       the shorter side is below `min_side` pixels
  extreme_aspect  max(h/w, w/h) is above `max_aspect` (the official filter drops ratio > 4.5;
                  every official bucket table spans h/w in [0.25, 4], so this also bounds how far
                  outside the table an image may be and still be cropped into its closest bucket)
  no_caption      the source has no caption for the image (raised by sources)
  bad_caption     the caption is empty or not text (raised by sources)
  source_error    the source could not produce the item (raised by sources, with the message)

Images are converted to RGB (palette / grey / 16-bit / CMYK / alpha -- alpha is composited on
white), the EXIF orientation is applied, and animated images use their first frame.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[bytes, str, os.PathLike, np.ndarray, Image.Image]

REASONS = ("unreadable", "not_a_file", "empty_file", "not_an_image", "corrupt", "too_large", "too_small",
           "extreme_aspect", "no_caption", "bad_caption", "source_error", "no_control")


class SkipExample(Exception):
  """An example that cannot be used; carries a reason code (see module doc) and a detail."""

  def __init__(self, reason: str, detail: str, *, name: str | None = None):
    if reason not in REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; use one of {REASONS}")
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail
    self.name = name  # the item's name when the source knows it


DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20  # one image file; PrepareOptions.max_image_bytes / prepare --max_image_mb


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
  """The bytes of a REGULAR file of at most `max_bytes` (symlinks followed). Raises SkipExample: "not_a_file" for
  a FIFO / device / socket / folder (checked on the opened descriptor, before any read: opening does not block),
  "too_large" above `max_bytes`, "unreadable" for an OSError."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
  except OSError as e:
    raise SkipExample("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}.get(stat.S_IFMT(st.st_mode), "not a regular file")
      raise SkipExample("not_a_file", f"{os.fspath(path)} is {kind}; only regular files are read")
    if st.st_size > max_bytes:
      raise SkipExample("too_large", f"{st.st_size} bytes, above the limit of {max_bytes} bytes per file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb", closefd=False) as f:
      data = f.read(max_bytes + 1)  # the file may grow after fstat
    if len(data) > max_bytes:
      raise SkipExample("too_large", f"more than the limit of {max_bytes} bytes per file")
    return data
  except OSError as e:
    raise SkipExample("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
  finally:
    os.close(fd)


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
  return img.convert("RGB")


def _from_array(arr: np.ndarray) -> np.ndarray:
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
    raise SkipExample("corrupt", f"array image has shape {arr.shape}; expected H W, H W 1, H W 3 or H W 4")
  if arr.dtype != np.uint8:
    if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 \
        and arr.max() <= 1:
      arr = np.round(arr * 255.0).astype(np.uint8)
    else:
      raise SkipExample("corrupt", f"array image has dtype {arr.dtype}; expected uint8 (or float in [0, 1])")
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  elif arr.shape[-1] == 4:
    arr = np.asarray(_to_rgb(Image.fromarray(arr, "RGBA")))
  return np.ascontiguousarray(arr)


def decode_image(image: ImageLike, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
  """bytes / path / PIL image / array -> H W 3 uint8 RGB. Raises SkipExample (never anything else
  for bad data). A path is read only if it is a regular file of at most `max_bytes` (so are encoded bytes)."""
  if isinstance(image, np.ndarray):
    return _from_array(image)
  if isinstance(image, Image.Image):
    try:
      return np.asarray(_to_rgb(ImageOps.exif_transpose(image)))
    except Exception as e:  # noqa: BLE001 -- any decode failure of a user image is a skip
      raise SkipExample("corrupt", f"{type(e).__name__}: {e}") from None
  if isinstance(image, (str, os.PathLike)):
    image = read_regular_file(image, max_bytes)
  if not isinstance(image, (bytes, bytearray, memoryview)):
    raise SkipExample("source_error", f"unsupported image object {type(image).__name__}")
  if len(image) > max_bytes:
    raise SkipExample("too_large", f"{len(image)} bytes, above the limit of {max_bytes} bytes per image")
  data = bytes(image)
  if not data:
    raise SkipExample("empty_file", "0 bytes")
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
      img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
      raise SkipExample("not_an_image", f"{len(data)} bytes in no known image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise SkipExample("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001
      raise SkipExample("corrupt", f"{type(e).__name__}: {e}") from None
    try:
      img.load()  # LOAD_TRUNCATED_IMAGES stays False: a truncated file raises here
      img = ImageOps.exif_transpose(img)
      return np.asarray(_to_rgb(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise SkipExample("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001
      raise SkipExample("corrupt", f"{img.format or 'image'}: {type(e).__name__}: {e}") from None


def check_size(height: int, width: int, *, min_side: int, max_aspect: float) -> None:
  """Raises SkipExample("too_small" | "extreme_aspect") for images `prepare` must not use."""
  if min(height, width) < min_side:
    raise SkipExample("too_small", f"{height}x{width} (HxW) has a side below min_side={min_side}")
  ar = height / width
  if max(ar, 1.0 / ar) > max_aspect:
    raise SkipExample("extreme_aspect",
                      f"{height}x{width} (HxW) has aspect ratio h/w={ar:.3g}, beyond max_aspect={max_aspect:g}")


def to_model_input(img: np.ndarray) -> np.ndarray:
  """H W 3 uint8 -> H W 3 float32 in [-1, 1] (x / 127.5 - 1)."""
  return img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
