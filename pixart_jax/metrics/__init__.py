"""Image-quality metrics in JAX, sharded over a mesh's batch axes.

FID: pytorch-fid's InceptionV3 (`inception`), streamed float64 statistics in pytorch-fid's `.npz` format
(`fid_stats`), the Frechet distance (`frechet`). CLIP score: transformers' CLIPModel towers (`clip`),
CLIPImageProcessor in JAX (`clip_preprocess`), torchmetrics' score and a mesh-aware scorer (`clip_score`).
Both on generated images, batch by batch: `evaluation` (what `python -m pixart_jax.evaluate` and the in-training
evaluation run).
Weights load through `pixart_jax.convert.inception_keys.load_inception` / `pixart_jax.convert.clip_keys.load_clip`.
"""
from pixart_jax.metrics.clip import CLIPConfig, CLIPModel
from pixart_jax.metrics.clip_preprocess import CLIPImageConfig, clip_preprocess
from pixart_jax.metrics.clip_score import CLIPScoreAccumulator, CLIPScorer, clip_scores
from pixart_jax.metrics.evaluation import ImageMetrics, Measured, MetricsAccumulator
from pixart_jax.metrics.fid_stats import ActivationStats, FIDStats
from pixart_jax.metrics.frechet import frechet_distance
from pixart_jax.metrics.inception import FIDInceptionV3, InceptionConfig
from pixart_jax.metrics.sharded import ShardedApply

__all__ = ["FIDInceptionV3", "InceptionConfig", "ActivationStats", "FIDStats", "frechet_distance", "CLIPConfig",
           "CLIPModel", "CLIPImageConfig", "clip_preprocess", "CLIPScorer", "CLIPScoreAccumulator", "clip_scores",
           "ShardedApply", "ImageMetrics", "Measured", "MetricsAccumulator"]
