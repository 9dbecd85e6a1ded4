"""Metric writers: JSONL (one object per logged step) and TensorBoard event files (tensorboardX; no TensorFlow).

Only process 0 writes (pass `enabled=jax.process_index() == 0`); other processes get a writer that does nothing.
Files: `<workdir>/metrics.jsonl` ({"step": N, "time": unix, name: value, ...} per line) and
`<workdir>/tensorboard/` (scalars, images). Images are also written as PNG under `<workdir>/samples/`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Mapping

import numpy as np


def first_nonfinite(history: list[tuple[int, Mapping[str, float]]], key: str = "loss") -> int | None:
  """The first step in `history` [(step, metrics)] whose `key` is NaN or infinite, else None."""
  for step, m in history:
    if not math.isfinite(float(m[key])):
      return step
  return None


class MetricWriter:
  """Writes scalars and images of a run. Use as a context manager or call close()."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One JSONL line and one TensorBoard scalar per name. Values become Python floats."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> list[pathlib.Path]:
    """uint8 images (H, W, 3) per name -> PNG `samples/<name>_<step>.png` and TensorBoard. Returns the paths."""
    if not self.enabled:
      return []
    from PIL import Image

    out_dir = self.workdir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in images.items():
      img = np.asarray(img)
      if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image {name!r} must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
      path = out_dir / f"{name}_{int(step):08d}.png"
      Image.fromarray(img).save(path)
      paths.append(path)
      if self._tb is not None:
        self._tb.add_image(name, img, int(step), dataformats="HWC")
    return paths

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file (for tests and notebooks)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
