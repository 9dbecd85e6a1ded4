"""The encoders `prepare` runs: captions -> T5 embeddings, images -> VAE posterior moments.

`Encoders` is the protocol `prepare` needs. Two implementations:

* `PretrainedEncoders`: the real T5 text encoder + AutoencoderKL (e.g. PixArt-Sigma's T5-XXL and
  SDXL VAE), each call jitted, the batch padded to a fixed multiple of the device count and
  sharded over a 1-D mesh of the local devices (each host encodes its own part of the source).
* `PixelEncoders`: a lossless space-to-depth "autoencoder" (latent = pixels rearranged
  `b (h p) (w q) c -> b h w (p q c)`, logvar at the clamp floor so std = exp(-15) ~ 3e-7) with any
  text encoder; the CPU demo trains on these exact "latents" and `decode` inverts them.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

from pixart_jax.models.text_encoder import MAX_LENGTH, TextEncoder
from pixart_jax.models.vae import AutoencoderKL
from pixart_jax.parallel.mesh import make_mesh
from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules, batch_shards, batch_sharding

LOGVAR_MIN = -30.0  # the posterior clamp (diffusers DiagonalGaussianDistribution)


class Encoders(Protocol):
  """What `prepare` needs from a text encoder + image autoencoder pair."""

  text_dim: int          # D of the caption embeddings
  latent_channels: int   # C of the latent
  downsample: int        # pixels per latent cell per side (8)
  scaling_factor: float  # latent -> diffusion space multiplier
  encoder_id: str        # stored in the manifest; a dataset is only resumed with the same id

  def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """B strings -> (embeddings B S D float32, mask B S int32; S = 300, 1 = real token)."""

  def encode_images(self, x: np.ndarray) -> np.ndarray:
    """x: B H W 3 float32 in [-1, 1] -> moments B H/f W/f 2C float32 ([mean, logvar])."""


def local_mesh() -> jax.sharding.Mesh:
  """A mesh over this process's devices, all on the `data` axis."""
  return make_mesh((("data", -1),), devices=jax.local_devices())


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
  extra = (-a.shape[0]) % multiple
  if not extra:
    return a
  return np.concatenate([a, np.repeat(a[:1], extra, axis=0)], axis=0)


class PretrainedEncoders:
  """T5 (via `TextEncoder`) + AutoencoderKL, jitted, batch sharded over the local devices.

  Calls with a fixed batch size compile once (per image shape for the VAE); `prepare` pads every
  batch to its `batch_size`, so each bucket compiles one VAE program.
  """

  def __init__(self, text_encoder: TextEncoder, vae: AutoencoderKL, *,
               mesh: jax.sharding.Mesh | None = None, encoder_id: str = "custom",
               max_length: int = MAX_LENGTH, rules: Rules = LOGICAL_RULES):
    self.text = text_encoder
    self.vae = vae
    self.mesh = local_mesh() if mesh is None else mesh
    if any(d.process_index != jax.process_index() for d in self.mesh.devices.flat):
      raise ValueError("PretrainedEncoders needs a mesh of this process's devices only "
                       "(each host encodes its own items); pass mesh=None for all local devices")
    self.sharding = batch_sharding(self.mesh, rules, 1)  # batches are padded to a multiple of the shards
    self.batch_multiple = batch_shards(self.mesh, rules)
    self.max_length = max_length
    self.text_dim = int(text_encoder.hidden_size)
    self.latent_channels = int(vae.config.latent_channels)
    self.downsample = int(vae.config.downsample_factor)
    self.scaling_factor = float(vae.config.scaling_factor)
    self.encoder_id = encoder_id
    self._encode = jax.jit(lambda model, x: model.encode(x))

  @classmethod
  def from_pretrained(cls, src: str, *, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None,
                      progress: bool = False) -> "PretrainedEncoders":
    """src: a diffusers pipeline dir or Hub id with `text_encoder/`, `tokenizer/` and `vae/`.

    dtype: compute and parameter dtype of both models (bf16 halves T5-XXL to 9.5 GB per device;
    the T5 residual stream, norms and the returned embeddings stay float32).
    """
    from pixart_jax.convert.vae_keys import load_vae
    mesh = local_mesh() if mesh is None else mesh
    text = TextEncoder.from_pretrained(src, dtype=dtype, mesh=mesh, progress=progress)
    vae = load_vae(src, dtype=dtype, mesh=mesh, progress=progress)
    return cls(text, vae, mesh=mesh, encoder_id=f"pretrained:{src}:{jnp.dtype(dtype).name}")

  def _put(self, a: np.ndarray) -> jax.Array:
    return jax.device_put(_pad_rows(a, self.batch_multiple), self.sharding)

  def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """B strings -> (B 300 D float32 embeddings, B 300 int32 mask)."""
    ids, mask = self.text.tokenize(list(prompts), self.max_length)
    with jax.set_mesh(self.mesh):
      emb = self.text.encode_ids(self._put(ids), self._put(mask))
    return np.asarray(emb, np.float32)[:len(ids)], np.asarray(mask, np.int32)

  def encode_images(self, x: np.ndarray) -> np.ndarray:
    """B H W 3 float32 in [-1, 1] -> B H/8 W/8 2C float32 moments."""
    x = np.asarray(x, np.float32)
    with jax.set_mesh(self.mesh):
      moments = self._encode(self.vae, self._put(x))
    return np.asarray(moments, np.float32)[:x.shape[0]]


class PixelEncoders:
  """Lossless space-to-depth image "encoder" + any text encoder (`encode_prompts`, `hidden_size`).

  latent_channels = 3 p^2 (p = downsample), scaling_factor = 1: a latent is the image in [-1, 1].
  """

  def __init__(self, text_encoder: Any, *, downsample: int = 8, text_id: str = "text"):
    if downsample < 1:
      raise ValueError(f"downsample must be >= 1, got {downsample}")
    self.text = text_encoder
    self.text_dim = int(text_encoder.hidden_size)
    self.downsample = int(downsample)
    self.latent_channels = 3 * downsample * downsample
    self.scaling_factor = 1.0
    self.encoder_id = f"pixel-space-to-depth:p{downsample}+{text_id}"

  def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    emb, mask = self.text.encode_prompts(list(prompts))
    return np.asarray(emb, np.float32), np.asarray(mask, np.int32)

  def encode_images(self, x: np.ndarray) -> np.ndarray:
    """B H W 3 -> B H/p W/p 2*3p^2: [pixels rearranged, logvar = LOGVAR_MIN]."""
    x = np.asarray(x, np.float32)
    p = self.downsample
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"PixelEncoders.encode_images: expected B H W 3 with H, W multiples of {p}, "
                       f"got {x.shape}")
    mean = einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=p, q=p)
    return np.concatenate([mean, np.full_like(mean, LOGVAR_MIN)], axis=-1)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """B h w 3p^2 latents (diffusion space = pixel space) -> B h*p w*p 3 images in [-1, 1]."""
    p = self.downsample
    return einops.rearrange(np.asarray(latents), "b h w (p q c) -> b (h p) (w q) c", p=p, q=p)
