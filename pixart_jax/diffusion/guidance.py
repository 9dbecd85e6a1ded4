"""Classifier-free guidance by batch doubling (docs/ARCHITECTURE.md §6.6).

`cfg_model_fn` turns a conditional network `apply_fn(x, t, caption, mask) -> (B, H, W, 2C)` into
the `model_fn(x, t)` the samplers take. The unconditional and conditional branches run as ONE
forward over 2B, in the order [uncond, cond]; out = u + scale * (c - u). With a Python scale of
exactly 1 the unconditional half is skipped (one forward over B).

Modes (which mask the unconditional branch sees):
  "diffusers": the uncond embedding with its OWN mask (diffusers PixArtSigmaPipeline: T5("")
               has mask length 1).
  "official":  the uncond embedding with the COND mask (official `PixArtMS.forward` repeats the
               one mask it gets), i.e. the uncond branch attends to the first L_c rows of T5(""),
               as in CFG-dropout training (docs/ARCHITECTURE.md §2.6).
`guide_channels`: None guides every output channel (diffusers). An int k guides only channels
[:k] and takes the other channels from the conditional branch — the official IDDPM
`forward_with_cfg` quirk inherited from DiT uses k = 3 (the 4th eps channel and the variance
channels are unguided). Guidance arithmetic is float32.
"""
from __future__ import annotations

import numbers
from typing import Callable

import jax.numpy as jnp

ApplyFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

MODES = ("diffusers", "official")


def _match_batch(a: jnp.ndarray, b: int, what: str) -> jnp.ndarray:
  if a.shape[0] == b:
    return a
  if a.shape[0] == 1:
    return jnp.broadcast_to(a, (b,) + a.shape[1:])
  raise ValueError(f"{what} has batch {a.shape[0]}, expected {b} or 1")


def cfg_model_fn(apply_fn: ApplyFn, cond: tuple[jnp.ndarray, jnp.ndarray],
                 uncond: tuple[jnp.ndarray, jnp.ndarray | None] | None, scale: float, *,
                 mode: str = "diffusers", guide_channels: int | None = None) -> ModelFn:
  """Builds model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B, H, W, C_out) f32 with CFG.

  Args:
    apply_fn: the network, apply_fn(x (N,H,W,C), t (N,), caption (N,S,D), mask (N,S)).
    cond: (caption (B,S,D), mask (B,S)) of the prompts.
    uncond: (caption, mask) of the negative / null prompt, batch B or 1; the mask may be None
      in "official" mode (the cond mask is used). Unused (may be None) when scale == 1.
    scale: the guidance scale. A Python number equal to 1 skips the unconditional branch; a
      traced value always runs both branches.
    mode: "diffusers" or "official" (see module docstring).
    guide_channels: None (all channels) or k (guide channels [:k], the rest from cond).
  """
  if mode not in MODES:
    raise ValueError(f"unknown guidance mode {mode!r}; valid modes: {', '.join(MODES)}")
  if guide_channels is not None and (not isinstance(guide_channels, int) or guide_channels < 1):
    raise ValueError(f"guide_channels must be None or a positive int, got {guide_channels!r}")
  cond_emb, cond_mask = cond
  if cond_emb.ndim != 3 or cond_mask.ndim != 2 or cond_mask.shape != cond_emb.shape[:2]:
    raise ValueError(
        f"cond caption must be (B,S,D) and mask (B,S); got {cond_emb.shape} and {cond_mask.shape}")
  skip_uncond = isinstance(scale, numbers.Real) and float(scale) == 1.0

  if skip_uncond:
    def model_fn(x, t):
      return apply_fn(x, t, cond_emb, cond_mask).astype(jnp.float32)
    return model_fn

  if uncond is None:
    raise ValueError("uncond (caption, mask) is required when the guidance scale is not 1")
  b = cond_emb.shape[0]
  un_emb = _match_batch(uncond[0], b, "uncond caption")
  if un_emb.shape[1:] != cond_emb.shape[1:]:
    raise ValueError(f"uncond caption {un_emb.shape} does not match cond caption {cond_emb.shape}")
  if mode == "official":
    un_mask = cond_mask
  else:
    if uncond[1] is None:
      raise ValueError('mode="diffusers" needs the uncond mask')
    un_mask = _match_batch(uncond[1], b, "uncond mask")
    if un_mask.shape != cond_mask.shape:
      raise ValueError(f"uncond mask {un_mask.shape} does not match cond mask {cond_mask.shape}")
  emb_in = jnp.concatenate([un_emb, cond_emb], axis=0)
  mask_in = jnp.concatenate([un_mask.astype(cond_mask.dtype), cond_mask], axis=0)

  def model_fn(x, t):
    if x.shape[0] != b:
      raise ValueError(f"x has batch {x.shape[0]} but the prompts have batch {b}")
    x_in = jnp.concatenate([x, x], axis=0)
    t_in = jnp.concatenate([t, t], axis=0)
    out = apply_fn(x_in, t_in, emb_in, mask_in).astype(jnp.float32)
    u, c = out[:b], out[b:]
    guided = u + scale * (c - u)
    if guide_channels is None:
      return guided
    return jnp.concatenate([guided[..., :guide_channels], c[..., guide_channels:]], axis=-1)

  return model_fn
