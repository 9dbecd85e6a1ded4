"""Tiny random PixArt-Sigma pipelines saved in the real diffusers format (tests, the notebook's CPU path).

Needs the `test` extra (torch, diffusers, transformers): the reference implementations write the files.
"""
from __future__ import annotations

import os
import pathlib

CAPTIONS = [
    "a photo of a cat sitting on a red sofa", "a watercolor painting of mountains at sunrise",
    "an astronaut riding a horse on the moon", "a bowl of ramen with chopsticks, studio lighting",
    "a small wooden cabin in a snowy forest at night", "portrait of an old fisherman, film grain",
    "a futuristic city skyline with flying cars", "macro shot of a dew drop on a green leaf",
]


def make_tiny_pipeline(out_dir: str | os.PathLike, *, seed: int = 0, sample_size: int = 32, layers: int = 2,
                       heads: int = 2, head_dim: int = 8, t5_dim: int = 32, vocab_size: int = 96,
                       vae_channels: tuple[int, ...] = (8, 8, 16, 16), vae_layers: int = 1,
                       vae_groups: int = 4) -> pathlib.Path:
  """Writes a diffusers PixArtSigmaPipeline with random weights to `out_dir` (save_pretrained); returns the path.

  T5: 2 layers, d_model `t5_dim`, with a SentencePiece tokenizer trained on CAPTIONS in the real T5 format.
  VAE: 4 levels (factor 8, like SDXL) with narrow channels (`vae_channels`, `vae_layers` resnets per block,
  `vae_groups` GroupNorm groups; (128, 256, 512, 512), 2, 32 is the SDXL VAE). DiT: `layers` blocks,
  `sample_size` latent (32 -> the 256 px bin table). Scheduler: DPMSolverMultistepScheduler as configured for
  PixArt-Sigma.
  """
  import torch
  from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
  from transformers import T5Config, T5EncoderModel, T5Tokenizer

  from pixart_jax.models.tokenizer import build_t5_tokenizer

  out = pathlib.Path(out_dir)
  tok_dir = out / "tokenizer"
  build_t5_tokenizer(CAPTIONS * 4, tok_dir, vocab_size=vocab_size)
  tokenizer = T5Tokenizer.from_pretrained(tok_dir)
  torch.manual_seed(seed)
  text_encoder = T5EncoderModel(T5Config(
      vocab_size=max(vocab_size, len(tokenizer)), d_model=t5_dim, d_ff=2 * t5_dim, d_kv=8, num_heads=4,
      num_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
      relative_attention_max_distance=16, dropout_rate=0.0, layer_norm_epsilon=1e-6)).eval()
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      layers_per_block=vae_layers, norm_num_groups=vae_groups, sample_size=sample_size * 8,
                      scaling_factor=0.13025).eval()
  transformer = PixArtTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
      cross_attention_dim=heads * head_dim, attention_bias=True, sample_size=sample_size, patch_size=2,
      activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
      norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=max(sample_size / 64, 0.5),
      use_additional_conditions=False, caption_channels=t5_dim).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():  # exercise the zero-initialised layers too
    for p in transformer.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
  scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                          num_train_timesteps=1000, solver_order=2, algorithm_type="dpmsolver++",
                                          solver_type="midpoint", lower_order_final=True,
                                          prediction_type="epsilon", timestep_spacing="linspace")
  pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
  pipe.save_pretrained(out)
  return out
