"""CLIP score as torchmetrics defines it, and a scorer that runs CLIP on a mesh.

torchmetrics (functional/multimodal/clip_score.py `_clip_score_update`, multimodal/clip_score.py `CLIPScore`):

  score_i = 100 * <e_img_i / |e_img_i|, e_txt_i / |e_txt_i|>       per image-caption pair (no clipping)
  CLIPScore = max(mean_i score_i, 0)                                 the MEAN is clipped at 0, not each pair

`CLIPScoreAccumulator` streams the sum and count in float64 on the host (`CLIPScore.update` / `compute`).

`CLIPScorer` = our CLIP towers + transformers' CLIP tokenizer (from the model directory) + the JAX port of
CLIPImageProcessor, each forward sharded over the mesh's batch axes (`metrics.sharded.ShardedApply`).
Captions are tokenized to `max_position_embeddings` (77) tokens with truncation that keeps the EOS token (a
longer caption is logged as a warning). torchmetrics instead pads to the longest caption and, past 77 tokens,
cuts the ids (dropping EOS); only such over-long captions can score differently.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixart_jax.convert.hub import read_json, resolve_local
from pixart_jax.metrics.clip import CLIPModel
from pixart_jax.metrics.clip_preprocess import CLIPImageConfig, clip_preprocess
from pixart_jax.metrics.sharded import ShardedApply
from pixart_jax.models.tokenizer import T5PromptTokenizer
from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules

__all__ = ["clip_scores", "CLIPScoreAccumulator", "CLIPScorer"]


def clip_scores(image_embeds, text_embeds) -> np.ndarray:
  """100 * cosine similarity of paired rows: image_embeds B E, text_embeds B E -> B float64 (not clipped)."""
  a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"image and text embeddings must both be (B, E), got {a.shape} and {b.shape}")
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.sum(a * b, axis=-1)


class CLIPScoreAccumulator:
  """Streamed torchmetrics CLIPScore: sum of per-pair scores and their count (float64, host)."""

  def __init__(self):
    self.total, self.n = 0.0, 0

  def update(self, image_embeds, text_embeds) -> np.ndarray:
    """Adds B pairs; returns their per-pair scores (B,)."""
    s = clip_scores(image_embeds, text_embeds)
    self.total += float(s.sum())
    self.n += s.shape[0]
    return s

  def merge(self, other: "CLIPScoreAccumulator") -> "CLIPScoreAccumulator":
    self.total += other.total
    self.n += other.n
    return self

  def compute(self) -> float:
    """max(mean score, 0)."""
    if self.n == 0:
      raise ValueError("no image-caption pairs accumulated")
    return max(self.total / self.n, 0.0)


class CLIPScorer:
  """CLIP embeddings and scores for images (B H W 3, uint8 or float in [0, 1]) and captions, on a mesh."""

  def __init__(self, model: CLIPModel, tokenizer: T5PromptTokenizer, image_config: CLIPImageConfig, *,
               mesh: jax.sharding.Mesh | None = None, rules: Rules = LOGICAL_RULES):
    self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
    size = model.config.vision.image_size
    if tuple(image_config.crop_size) != (size, size):
      raise ValueError(f"the image processor crops to {image_config.crop_size}, the vision tower takes "
                       f"{size}x{size} images")
    self.max_length = model.config.text.max_position_embeddings
    self._images = ShardedApply(model, lambda m, x: m.image_features(clip_preprocess(x, image_config)), mesh, rules)
    self._texts = ShardedApply(model, lambda m, ids, mask: m.text_features(ids, mask), mesh, rules)

  @classmethod
  def from_pretrained(cls, src: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                      rules: Rules = LOGICAL_RULES, dtype=jnp.float32, param_dtype=None,
                      precision=jax.lax.Precision.HIGHEST, progress: bool = False) -> "CLIPScorer":
    """src: a transformers CLIPModel directory (config.json, weights, tokenizer files, preprocessor_config.json)
    or a Hub id such as openai/clip-vit-large-patch14 (torchmetrics' default)."""
    from pixart_jax.convert.clip_keys import CLIP_FILES, load_clip  # convert/ imports this package's models

    local = resolve_local(src, allow_patterns=CLIP_FILES)
    model = load_clip(local, dtype=dtype, param_dtype=param_dtype, precision=precision, mesh=mesh, rules=rules,
                      progress=progress)
    proc = local / "preprocessor_config.json"
    if proc.is_file():
      image_config = CLIPImageConfig.from_hf_config(read_json(proc, "CLIP preprocessor config"))
    else:
      image_config = CLIPImageConfig.for_image_size(model.config.vision.image_size)
    return cls(model, T5PromptTokenizer.from_pretrained(local), image_config, mesh=mesh, rules=rules)

  def image_embeds(self, images) -> np.ndarray:
    """images: B H W 3 (uint8, or float in [0, 1]) -> B E float32 (unnormalized)."""
    return self._images(images)

  def text_embeds(self, captions: Sequence[str]) -> np.ndarray:
    """B captions -> B E float32 (unnormalized)."""
    ids, mask = self.tokenizer.tokenize(captions, max_length=self.max_length)
    return self._texts(ids, mask)

  def scores(self, images, captions: Sequence[str]) -> np.ndarray:
    """Per-pair 100 * cosine (B,), unclipped; feed `CLIPScoreAccumulator` for the clipped mean."""
    if len(captions) != np.shape(images)[0]:
      raise ValueError(f"{np.shape(images)[0]} images but {len(captions)} captions")
    return clip_scores(self.image_embeds(images), self.text_embeds(captions))
