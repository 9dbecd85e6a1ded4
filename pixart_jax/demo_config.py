"""The embedded demo's shapes and training config (`pixart_jax.demo` runs it; `configs/demo.py` sweeps it).

Kept apart from `pixart_jax.demo`, whose command-line flags (--workdir, --steps, ...) must not be defined by a
config file that only needs the config.
"""
from __future__ import annotations

DOWNSAMPLE = 2  # space-to-depth factor of the pixel autoencoder: 8x8x3 image <-> 4x4x12 latent
CAPTION_TOKENS = 16  # the demo captions are short: keep 16 T5 positions instead of 300 (the model is length-agnostic)
T5_WIDTH = 128


def latent_size() -> int:
  from pixart_jax.data.demo import IMAGE_SIZE

  return IMAGE_SIZE // DOWNSAMPLE


def train_config(data_dir: str, *, steps: int, batch: int, seed: int):
  """The tiny PixArt: 4 blocks of width 96 over the 4x4 latent grid (patch 1: 16 tokens of 12 channels)."""
  from pixart_jax.data.demo import IMAGE_SIZE
  from pixart_jax.train.config_defaults import base_config

  c = base_config(preset="tiny", table=None, batch_size=batch, warmup=100, lr=5e-4)
  c.seed = seed
  o = c.model.overrides
  o.depth, o.hidden_size, o.num_heads, o.patch_size = 4, 96, 4, 1
  o.in_channels, o.caption_channels, o.sample_size = 3 * DOWNSAMPLE**2, T5_WIDTH, latent_size()
  o.max_caption_len, o.interpolation_scale, o.image_size = CAPTION_TOKENS, 1.0, IMAGE_SIZE
  c.model.dtype, c.model.remat = "float32", "none"
  c.mesh = (("data", -1),)
  c.data.dir = data_dir
  c.optimizer.name, c.optimizer.auto_lr, c.optimizer.clip = "adamw", "none", 1.0
  c.optimizer.betas, c.optimizer.eps, c.optimizer.weight_decay = (0.9, 0.999), (1e-8,), 0.0
  c.ema.rate = 0.995
  c.steps, c.log_every, c.ckpt_every, c.keep = steps, 250, steps, 1
  return c
