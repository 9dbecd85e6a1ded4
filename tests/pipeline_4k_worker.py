"""Samples ONE 4096 x 4096 request (512 x 512 latent, 256 x 256 = 65,536 tokens) end to end in this process and
prints one JSON line: the image's shape and dtype, the layout the Pipeline chose, seconds per stage and the peak
RSS of this process (VmHWM) in MiB.

    python tests/pipeline_4k_worker.py PIPELINE_DIR

PIPELINE_DIR: a tiny diffusers pipeline (`pixart_jax.testing.make_tiny_pipeline`) whose T5 is used. The DiT is a
tiny-width PixArt-Sigma (random weights) with KV compression in every layer and attention="auto"; the VAE has the
SDXL layout (4 levels, factor 8) at 2 channels per level without the mid-block attention (random weights), so the
4096 x 4096 decode (25 tiles of 1024 px by the Pipeline's rule) costs tens of seconds on 2 cores, not minutes.
Used by tests/test_sampling_layout.py (a subprocess, so the peak RSS is this request's alone).
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

import pixart_jax as pj
from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.text_encoder import TextEncoder
from pixart_jax.models.vae import AutoencoderKL, VAEConfig

SIZE = 4096


def peak_rss_mib() -> float:
  """The peak RSS of this process's memory since it started (/proc/self/status VmHWM). Not ru_maxrss: Linux carries
  that over from the parent across fork + exec, so under a large pytest worker it reports the worker's size."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024  # KiB
  raise RuntimeError("no VmHWM in /proc/self/status")


def main(path: str) -> None:
  text = TextEncoder.from_pretrained(path, dtype=jnp.float32)
  vae = AutoencoderKL(VAEConfig(block_out_channels=(2, 2, 2, 2), layers_per_block=1, norm_num_groups=1,
                                mid_block_add_attention=False), dtype=jnp.float32, rngs=nnx.Rngs(1))
  cfg = get_preset("tiny", hidden_size=16, num_heads=2, depth=2, caption_channels=text.hidden_size,
                   max_caption_len=300, sample_size=SIZE // 8, interpolation_scale=8.0, image_size=SIZE,
                   kv_compress_layers=(0, 1), kv_compress_ratio=2)
  dit = PixArtSigma(cfg, dtype=jnp.float32, attention="auto", rngs=nnx.Rngs(0))
  pipe = pj.Pipeline(text, dit, vae)
  layout = pipe.layout(1, SIZE, SIZE)
  timings: dict = {}
  t0 = time.perf_counter()
  img = pipe(["a small wooden cabin in a snowy forest at night"], height=SIZE, width=SIZE, steps=1,
             guidance_scale=4.5, use_resolution_binning=False, seed=0, timings=timings)
  total = time.perf_counter() - t0
  rss_mib = peak_rss_mib()
  print(json.dumps({"shape": list(img.shape), "dtype": str(img.dtype), "std": float(np.asarray(img).std()),
                    "sequence": layout.sequence, "vae_tile_latent": layout.vae_tile_latent,
                    "timings": timings, "seconds": total, "peak_rss_mib": rss_mib}))


if __name__ == "__main__":
  main(sys.argv[1])
