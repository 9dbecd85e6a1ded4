r"""Weak-to-strong stage 1: VAE adaptation at 256 px (spec 4.9: PixArt-alpha 256 -> Sigma data, 8K steps, lr 2e-5).

Start: a PixArt-alpha 256 px checkpoint (SD1.5-VAE latents, 120-token T5) converted to Orbax
(`python -m pixart_jax.convert --source PixArt-XL-2-256x256.pth --config sigma-xl2-256 --out ckpt/alpha256`).
Train on Sigma data: SDXL-VAE latents and 300-token T5 captions (`pixart_jax.prepare` with the
`pixart_sigma_sdxlvae_T5_diffusers` encoders, max_length 300). Same architecture, PE interpolation 0.5; the
non-strict rule applied: micro-condition embedders (csize/ar) of an alpha checkpoint are dropped (`convert.ours`).

Chain (each stage's --config.init_from is the previous stage's workdir; the newest checkpoint's EMA if kept):
  vae_adapt_256 -> upscale_512 -> upscale_1024 -> {upscale_2k, kv_compress_1024}   (README.md)

  python -m pixart_jax.train --config configs/weak_to_strong/vae_adapt_256.py \
      --workdir gs://B/w2s/256 --config.data.dir gs://B/data/sigma256 --config.init_from gs://B/ckpt/alpha256
CPU smoke run (the test starts it from a tiny alpha-style Orbax dir with micro-conditions):
  python -m pixart_jax.train --config configs/weak_to_strong/vae_adapt_256.py:smoke,init_from=DIR --workdir /tmp/w2s_256
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_w2s_stage", pathlib.Path(__file__).with_name("_stage.py"))
_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage)


def get_config(arg=None):
  arg = _stage.load_common().parse_arg(arg, smoke=False, init_from="")
  c = _stage.stage(preset="sigma-xl2-256", table=None, batch_size=1024, warmup=1000, lr=2e-5, steps=8_000, res=256,
                   interpolation=0.5, init_from=None, arg=arg)
  return c
