"""Helpers for DiT parity tests: tiny diffusers PixArt transformers with random (non-zero) weights."""
from __future__ import annotations

import numpy as np
import torch


def tiny_diffusers_transformer(*, layers=2, heads=2, head_dim=8, caption_channels=24, sample_size=8,
                               interpolation_scale=1.0, micro=False, seed=0):
  from diffusers import PixArtTransformer2DModel

  torch.manual_seed(seed)
  model = PixArtTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
      cross_attention_dim=heads * head_dim, attention_bias=True, sample_size=sample_size, patch_size=2,
      activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
      norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=interpolation_scale,
      use_additional_conditions=micro, caption_channels=caption_channels)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():  # zero-initialised layers (proj_out, attn2.to_out) must be exercised too
      p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
  return model.eval()


def diffusers_forward(model, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray, mask: np.ndarray,
                      resolution=None, aspect_ratio=None) -> np.ndarray:
  """Runs the diffusers model on NHWC input; returns NHWC output (float64 numpy)."""
  added = {"resolution": None, "aspect_ratio": None}
  if resolution is not None:
    added = {"resolution": torch.from_numpy(np.asarray(resolution, np.float32)),
             "aspect_ratio": torch.from_numpy(np.asarray(aspect_ratio, np.float32))}
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                encoder_attention_mask=torch.from_numpy(mask), added_cond_kwargs=added, return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 1).astype(np.float64)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
