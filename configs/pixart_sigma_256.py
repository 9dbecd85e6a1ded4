r"""PixArt-Sigma XL/2 at 256 px, single scale (official `PixArt_sigma_xl2_img256_internal.py`, docs/ARCHITECTURE.md §5.1).

Stage: text-image alignment on 256 px (paper: 80K steps, CAME lr 2e-5, 300-token T5 captions), pe_interpolation
0.5, SDXL VAE latents. The official run used 64 images per GPU; here `data.batch_size` is the GLOBAL batch and the
sqrt rule sets the lr: 2e-5 * sqrt(batch / 256).

Train (TPU pod slice, run on every host; resumes from --workdir automatically):
  python -m pixart_jax.train --config configs/pixart_sigma_256.py \
      --workdir gs://BUCKET/runs/sigma256 --config.data.dir gs://BUCKET/data/sigma256
Fine-tune the released 256 model instead of training from scratch:
  python -m pixart_jax.train --config configs/pixart_sigma_256.py --workdir DIR --config.data.dir DATA \
      --config.init_from PixArt-alpha/PixArt-Sigma-XL-2-256x256
CPU smoke run (tiny model, synthetic data, a few steps):
  python -m pixart_jax.train --config configs/pixart_sigma_256.py:smoke --workdir /tmp/sigma256_smoke
"""
from pixart_jax.train import config_defaults as common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config(preset="sigma-xl2-256", table=None, batch_size=1024, warmup=1000)
  c.steps = 80_000
  if arg.smoke:
    common.smoke(c)
  return c
