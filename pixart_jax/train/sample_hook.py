"""The sampling grid drawn during training with the weights being trained (off unless `sample.every` > 0)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pixart_jax.models.spec import ModelSpec

SampleFn = Callable[[Any, int], dict]  # (params as nnx.State, step) -> {name: uint8 (H, W, 3)}


def make_draw(graphdef, vae_graph, *, sampler: str, steps: int) -> Callable:
  """The jitted program of the training hooks (this grid, `train.eval_hook`): the denoising loop
  (`diffusion.denoise`) then the VAE decode.

  (params, vae_params, x_T (B h w C), cond, uncond | None, scale ()) -> images (B H W 3) float32 in [-1, 1]."""
  from pixart_jax.diffusion.denoise import denoise

  sample = functools.partial(denoise, graphdef, sampler=sampler, steps=steps)

  @jax.jit
  def draw(params, vae_params, x_T, cond, uncond, scale):
    z = sample(params, x_T, cond, uncond, scale, None)
    dec = nnx.merge(vae_graph, vae_params)
    return dec.decode(dec.unscale_latent(z)).astype(jnp.float32)

  return draw


def make_sample_fn(sample_cfg, spec: ModelSpec, graphdef, mesh, rules, caption_len: int) -> SampleFn:
  """A SampleFn drawing `sample.prompts` with the weights being trained.

  The prompts (and "" for guidance) are encoded ONCE with the T5 of `sample.pipeline` (a diffusers PixArt-Sigma
  pipeline dir / Hub id with text_encoder/, tokenizer/, vae/), then the encoder is dropped; each call runs
  `sample.sampler` for `sample.num_steps` steps with CFG `sample.guidance` from fixed noise (seed
  `sample.seed`) at the model's square size (`diffusion.denoise`, the Pipeline's program) and decodes with the
  pipeline's VAE: one jitted program, every process takes part, process 0 gets a contact sheet
  {"samples": uint8 (rows*H, 4*W, 3)}.
  """
  from pixart_jax.convert.vae_keys import load_vae
  from pixart_jax.images import contact_sheet, to_uint8
  from pixart_jax.models.text_encoder import TextEncoder
  from pixart_jax.pipeline import initial_noise

  if not sample_cfg.pipeline:
    raise ValueError("sample.every > 0 needs sample.pipeline: a diffusers PixArt-Sigma pipeline dir or Hub id "
                     "with text_encoder/, tokenizer/ and vae/ (e.g. PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers)")
  prompts = list(sample_cfg.prompts)
  text = TextEncoder.from_pretrained(sample_cfg.pipeline, mesh=mesh, rules=rules)
  # Host values, then replicated over the whole mesh (global arrays: valid inputs on every process).
  replicate = lambda a: jax.device_put(np.asarray(a), NamedSharding(mesh, PartitionSpec()))  # noqa: E731
  # prompts and "" at one caption length: the bucket of the longest prompt (`caption_bucket`; the pads are masked)
  # "" once: the guidance broadcasts a batch-1 negative (`guidance.cfg_model_fn`)
  emb, mask = text.encode_prompts(prompts + [""], max_length=caption_len, trim=True)
  n = len(prompts)
  cond, uncond = (replicate(emb[:n]), replicate(mask[:n])), (replicate(emb[n:]), replicate(mask[n:]))
  del text
  vae = load_vae(sample_cfg.pipeline, mesh=mesh, rules=rules)
  vae_graph, vae_state = nnx.split(vae)
  size = spec.cfg.sample_size
  noise = replicate(initial_noise(sample_cfg.seed, len(prompts), (size, size, spec.cfg.in_channels)))
  guidance = float(sample_cfg.guidance)
  scale = replicate(np.float32(guidance))
  draw = make_draw(graphdef, vae_graph, sampler=sample_cfg.sampler, steps=sample_cfg.num_steps)

  def sample_fn(params, step: int) -> dict:
    del step
    images = draw(params, vae_state, noise, cond, uncond if guidance != 1.0 else None, scale)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      images = multihost_utils.process_allgather(images, tiled=True)
    return {"samples": np.asarray(contact_sheet(to_uint8(images), cols=min(4, len(prompts))))}

  return sample_fn
