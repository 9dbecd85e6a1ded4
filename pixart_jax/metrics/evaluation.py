"""One evaluation of generated images: FID (pytorch-fid's Inception features, streamed statistics, the Frechet
distance to reference statistics) and CLIP score (torchmetrics' definition), batch by batch.

    metrics = ImageMetrics.from_files("pt_inception-2015-12-05-6726825d.pth", "openai/clip-vit-large-patch14",
                                      mesh=mesh)
    acc = MetricsAccumulator(metrics.feature_dim)
    for images, captions in batches:                 # images B H W 3 uint8 (one size per batch)
      acc.add(metrics.measure(images, captions))     # Measured: features B D, clip scores B (or None)
    report = acc.result(FIDStats.load("ref.npz"))    # {"fid": ..., "clip_score": ..., "num_images": N}

The same pieces serve `python -m pixart_jax.evaluate` (its run, `metrics/eval_run.py`, keeps the finished batches
on disk as `Measured` arrays, so a rerun adds them back instead of recomputing) and the in-training evaluation
(`train/eval_hook.py`).
Both networks run through `metrics.sharded.ShardedApply`: the batch split over the mesh's batch axes.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np

from pixart_jax.metrics.clip_score import CLIPScoreAccumulator, CLIPScorer
from pixart_jax.metrics.fid_stats import ActivationStats, FIDStats
from pixart_jax.metrics.frechet import frechet_distance
from pixart_jax.metrics.inception import FIDInceptionV3
from pixart_jax.metrics.sharded import ShardedApply
from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules

__all__ = ["check_source", "Measured", "ImageMetrics", "MetricsAccumulator", "reference_stats", "image_dir_files",
           "image_dir_batches", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Measured:
  """What one batch contributes: Inception pool3 features (B D float32) and per-pair CLIP scores (B float64,
  None without a CLIP model)."""
  features: np.ndarray
  clip_scores: np.ndarray | None = None

  def arrays(self) -> dict[str, np.ndarray]:
    """For `np.savez` (see `from_arrays`)."""
    out = {"features": np.asarray(self.features, np.float32)}
    if self.clip_scores is not None:
      out["clip_scores"] = np.asarray(self.clip_scores, np.float64)
    return out

  @classmethod
  def from_arrays(cls, arrays) -> "Measured":
    return cls(np.asarray(arrays["features"]),
               np.asarray(arrays["clip_scores"]) if "clip_scores" in arrays else None)


def check_source(flag: str, src, what: str) -> None:
  """`src` must be an existing file / folder or a Hub id (`org/name`): anything else is refused by name before
  anything loads."""
  from pixart_jax.convert.hub import parse_hub_id

  text = os.fspath(src)
  if not pathlib.Path(text).expanduser().exists() and parse_hub_id(text) is None:
    raise FileNotFoundError(f"{flag} {text}: no such file or folder (expected {what})")


class ImageMetrics:
  """The networks of one evaluation: an FID Inception and (optionally) a CLIP scorer, on a mesh."""

  def __init__(self, inception: FIDInceptionV3, clip: CLIPScorer | None = None, *,
               mesh: jax.sharding.Mesh | None = None, rules: Rules = LOGICAL_RULES):
    self.inception, self.clip = inception, clip
    self.feature_dim = inception.config.feature_dim
    self._features = ShardedApply(inception, lambda net, x: net(x.astype("float32") / 255.0), mesh, rules)

  @classmethod
  def from_files(cls, inception: str | os.PathLike, clip: str | os.PathLike | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, rules: Rules = LOGICAL_RULES,
                 use_fid_inception: bool = True) -> "ImageMetrics":
    """inception: an Inception3 state dict (pytorch-fid's `pt_inception-2015-12-05-*.pth`, or a torchvision-layout
    one with `use_fid_inception=False`); its channel width is read from the file. clip: a transformers CLIPModel
    directory or Hub id (None: no CLIP score). Missing files are refused by name before anything loads."""
    from pixart_jax.convert.inception_keys import inception_config_for, load_inception

    check_source("--inception", inception, "an Inception3 .pth/.safetensors, e.g. pytorch-fid's "
                 "pt_inception-2015-12-05-6726825d.pth")
    if clip is not None:
      check_source("--clip", clip, "a transformers CLIPModel folder or a Hub id such as openai/clip-vit-large-patch14")
    config = inception_config_for(inception, use_fid_inception=use_fid_inception)
    net = load_inception(inception, config=config, mesh=mesh, rules=rules)
    scorer = CLIPScorer.from_pretrained(clip, mesh=mesh, rules=rules) if clip is not None else None
    return cls(net, scorer, mesh=mesh, rules=rules)

  def features(self, images) -> np.ndarray:
    """images: B H W 3 uint8 (one size) -> Inception pool3 features B D float32 (host)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    return np.asarray(self._features(images), np.float32)

  def measure(self, images, captions: Sequence[str] | None = None) -> Measured:
    """Features of B uint8 images and, with a CLIP model and captions, their per-pair CLIP scores."""
    scores = None
    if self.clip is not None and captions is not None:
      scores = self.clip.scores(np.asarray(images), list(captions))
    return Measured(self.features(images), scores)


class MetricsAccumulator:
  """Streamed FID activation statistics and CLIP score over `Measured` batches."""

  def __init__(self, feature_dim: int):
    self.stats = ActivationStats(feature_dim)
    self.clip = CLIPScoreAccumulator()

  @property
  def num_images(self) -> int:
    return self.stats.n

  def add(self, m: Measured) -> "MetricsAccumulator":
    self.stats.update(m.features)
    if m.clip_scores is not None:
      s = np.asarray(m.clip_scores, np.float64)
      self.clip.total += float(s.sum())
      self.clip.n += s.shape[0]
    return self

  def result(self, ref: FIDStats | None) -> dict:
    """{"fid" (vs `ref`; omitted without one), "clip_score" (omitted without CLIP scores), "num_images"}."""
    out: dict = {"num_images": self.stats.n}
    if ref is not None:
      if ref.mu.shape[0] != self.stats.dim:
        raise ValueError(f"the reference statistics have {ref.mu.shape[0]}-d features, the Inception gives "
                         f"{self.stats.dim}-d ones: compute them with the same Inception weights")
      out["fid"] = frechet_distance(*self.stats.fid_stats(), *ref)
    if self.clip.n:
      out["clip_score"] = self.clip.compute()
    return out


def image_dir_files(folder: str | os.PathLike) -> list[pathlib.Path]:
  """The image files of `folder` (recursively, sorted); ValueError when there are none."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: not a folder of images")
  files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return files


def image_dir_batches(folder: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
  """uint8 RGB batches (B H W 3) of the images in `folder`; consecutive images of one size share a batch."""
  from pixart_jax.data.image_io import SkipExample, decode_image

  batch: list[np.ndarray] = []
  for path in image_dir_files(folder):
    try:
      img = decode_image(str(path))
    except SkipExample as e:
      raise ValueError(f"{path}: not a readable image ({e})") from None
    if batch and img.shape != batch[0].shape:
      yield np.stack(batch)
      batch = []
    batch.append(img)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)


def reference_stats(metrics: ImageMetrics, batches: Iterable[np.ndarray], *, progress: bool = False) -> FIDStats:
  """FID statistics (mu, sigma in float64) of uint8 image batches."""
  from tqdm import tqdm

  stats = ActivationStats(metrics.feature_dim)
  with tqdm(unit="img", desc="reference features", disable=not progress) as bar:
    for images in batches:
      stats.update(metrics.features(images))
      bar.update(len(images))
  if stats.n < 2:
    raise ValueError(f"FID statistics need at least 2 images, got {stats.n}")
  return stats.fid_stats()
