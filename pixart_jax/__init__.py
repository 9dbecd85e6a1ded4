"""pixart_jax: PixArt-Sigma in JAX / Flax NNX.

    import pixart_jax as pj
    pipe = pj.Pipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", dtype=jnp.bfloat16)
    images = pipe(["a cat"], height=1024, width=768, steps=20, guidance_scale=4.5, seed=0)
    model = pj.load_transformer("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
"""
from pixart_jax.convert.dit import export_transformer, load_transformer
from pixart_jax.models.config import PRESETS, DiTConfig, get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.pipeline import Pipeline, enable_compilation_cache


def encode_prompts(text_encoder, prompts, max_length: int = 300):
  """(embeds (B, 300, D), mask (B, 300)) from a `TextEncoder` (see pixart_jax.models.text_encoder)."""
  return text_encoder.encode_prompts(prompts, max_length)


def load_text_encoder(src, **kw):
  from pixart_jax.models.text_encoder import TextEncoder

  return TextEncoder.from_pretrained(src, **kw)


def load_vae(src, **kw):
  from pixart_jax.convert.vae_keys import load_vae as _load

  return _load(src, **kw)


__all__ = ["DiTConfig", "PRESETS", "PixArtSigma", "Pipeline", "encode_prompts", "enable_compilation_cache",
           "export_transformer", "get_preset", "load_text_encoder", "load_transformer", "load_vae"]
