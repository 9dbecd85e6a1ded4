r"""PixArt-Sigma XL/2 at 512 px, multi-aspect (official `PixArt_sigma_xl2_img512_internalms.py`, docs/ARCHITECTURE.md §5.1).

Stage: high aesthetics at 512 px (paper: 10K steps, lr 2e-5), aspect-ratio buckets of ASPECT_RATIO_512,
pe_interpolation 1.0, warmup 1000. Weak-to-strong: starts from the 256 px weights; the PE interpolation change
(0.5 -> 1.0) is only a config change (the position embedding is recomputed, not stored). Official batch: 2 per GPU
("48 as default"); `data.batch_size` is the GLOBAL batch, lr = 2e-5 * sqrt(batch / 256).

Train (every host of the slice):
  python -m pixart_jax.train --config configs/pixart_sigma_512_ms.py \
      --workdir gs://BUCKET/runs/sigma512 --config.data.dir gs://BUCKET/data/sigma512
From your own 256 px checkpoint (exported or converted) instead of the released one:
  ... --config.init_from /path/to/transformer_dir
CPU smoke run:
  python -m pixart_jax.train --config configs/pixart_sigma_512_ms.py:smoke --workdir /tmp/sigma512_smoke
Sweep (lr x warmup, 6 trials, see `get_sweep`; on Cloud TPU: launch/sweep.sh):
  python -m pixart_jax.sweep --config configs/pixart_sigma_512_ms.py --workdir gs://BUCKET/sweeps/sigma512 \
      --config.data.dir gs://BUCKET/data/sigma512 --config.steps 2000
"""
from pixart_jax import sweeps
from pixart_jax.train import config_defaults as common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config(preset="sigma-xl2-512-ms", table="512", batch_size=512, warmup=1000)
  c.steps = 10_000
  c.init_from = "PixArt-alpha/PixArt-Sigma-XL-2-256x256"
  if arg.smoke:
    common.smoke(c)
    c.init_from = None
  return c


def get_sweep(arg=None):
  """The 512 px fine-tune's learning rate (around the paper's 2e-5 at batch 256, before `auto_lr` scaling) x
  warmup: 6 trials."""
  del arg  # the same trials for the full and the smoke config
  return sweeps.product(sweeps.values("optimizer.lr", [1e-5, 2e-5, 4e-5]),
                        sweeps.values("optimizer.warmup", [500, 1000]))
