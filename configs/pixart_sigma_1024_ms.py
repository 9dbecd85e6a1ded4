r"""PixArt-Sigma XL/2 at 1024 px, multi-aspect (official `PixArt_sigma_xl2_img1024_internalms.py`, docs/ARCHITECTURE.md §5.1).

Stage: high aesthetics at 1024 px (paper: 5K steps; the paper used lr 1e-5 here, the shipped config 2e-5 — we keep
the config's 2e-5, pass --config.optimizer.lr=1e-5 for the paper's), ASPECT_RATIO_1024 buckets, pe_interpolation
2.0, warmup 1000, starting from the 512 px weights. Official batch 2 per GPU; `data.batch_size` is the GLOBAL batch,
lr = lr_256 * sqrt(batch / 256).

Train (every host of the slice):
  python -m pixart_jax.train --config configs/pixart_sigma_1024_ms.py \
      --workdir gs://BUCKET/runs/sigma1024 --config.data.dir gs://BUCKET/data/sigma1024
CPU smoke run:
  python -m pixart_jax.train --config configs/pixart_sigma_1024_ms.py:smoke --workdir /tmp/sigma1024_smoke
"""
from pixart_jax.train import config_defaults as common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config(preset="sigma-xl2-1024-ms", table="1024", batch_size=256, warmup=1000)
  c.steps = 5_000
  c.init_from = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
  if arg.smoke:
    common.smoke(c)
    c.init_from = None
  return c
