"""The denoising program: one pure function, the same for the Pipeline, the training sample hook and the planner.

Axis legend: B batch, H W latent height/width, C latent channels, S caption tokens, Dc caption width.

    run = jax.jit(functools.partial(denoise, graphdef), static_argnames=STATIC_ARGNAMES)
    x0 = run(state, x_T, (emb, mask), (neg_emb, neg_mask), jnp.float32(4.5), jax.random.key(0),
             sampler="dpm-solver", steps=20, mode="diffusers")

It is the whole sampling loop (classifier-free guidance by batch doubling inside the sampler's `lax.scan`), so
one jitted program per (batch, latent shape, sampler, steps, guidance on/off, mode); the guidance scale and the
key are traced arguments. New ways to start or steer the loop (an img2img start step / strength, an inpainting
mask with its known latents, ControlNet inputs, another sampler such as LCM) are keyword-only arguments of
`denoise`, so every caller gets them at once (see docs/CONVENTIONS.md).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.diffusion import samplers
from pixart_jax.diffusion.guidance import cfg_model_fn

# The keyword arguments that shape the program (static under jit); everything else is traced.
STATIC_ARGNAMES = ("sampler", "steps", "mode", "strength")
Caption = tuple[jax.Array, jax.Array]


def denoise(graphdef: nnx.GraphDef, state: Any, latents: jax.Array, cond: Caption, uncond: Caption | None,
            scale: jax.Array, key: jax.Array | None, *, sampler: str, steps: int,
            mode: str = "diffusers", strength: float = 1.0, image_latents: jax.Array | None = None,
            mask: jax.Array | None = None, control: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """x_T -> x_0 with the DiT `nnx.merge(graphdef, state)`.

  latents: (B H W C) float32 initial noise x_T at the sample size.
  cond: (caption (B S Dc), mask (B S)) of the prompts.
  uncond: (caption, mask) of the negative prompt (batch B or 1), or None: no guidance (one forward over B per
    step; `scale` is then unused).
  scale: () float32 guidance scale. key: the sampler's random key (stochastic samplers), or None.
  sampler / steps: a key of `samplers.SAMPLERS` and its step count. mode: "diffusers" | "official" (which mask
    the unconditional branch sees, `guidance.cfg_model_fn`).
  strength: image-to-image (SDEdit): in (0, 1]; only the last steps run (diffusers' img2img timestep selection,
    `samplers.img2img_start`), from `image_latents` noised with `latents` to the level of the first of them
    (LCM: diffusers' LCM img2img grid). 1 starts from `latents`: text-to-image, bit for bit. Static.
  image_latents: (B H W C) float32 clean (scaled) latents of the image, for strength < 1 and inpainting.
  mask: (B H W 1) inpainting mask at the latent resolution, 1 = generate, 0 = keep the image (binary); after
    every step the kept region is set to `image_latents` noised with `latents` to that step's level.
  control: (control latent (B H W C), control_scale ()) for a ControlNet (`models.controlnet.ControlPixArtSigma`:
    `graphdef, state` are then the wrapper's); the latent is repeated over the guidance halves.
  Returns x_0 (B H W C) float32.
  """
  if mask is not None and image_latents is None:
    raise ValueError("denoise: an inpainting mask needs image_latents (the image to keep where mask = 0)")
  known = None if image_latents is None else samplers.Known(image_latents, mask)
  model = nnx.merge(graphdef, state)
  guided = uncond is not None

  def apply(x, t, y, m):
    if control is None:
      return model(x, t, y, m)
    c, c_scale = control
    c = jnp.concatenate([c] * (x.shape[0] // c.shape[0]), axis=0) if x.shape[0] != c.shape[0] else c
    return model(x, t, y, m, control=c, control_scale=c_scale)

  model_fn = cfg_model_fn(apply, cond, uncond, scale if guided else 1.0, mode=mode)
  return samplers.sample(sampler, model_fn, latents, num_steps=steps, key=key, strength=strength, known=known)
