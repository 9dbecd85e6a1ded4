r"""KV-compression fine-tune at 2K (the official 2K kvcompress config with compression actually on, docs/ARCHITECTURE.md §3.3, §5.1).

The shipped 2K file has kv_compress=False (PixArt-sigma #131); this recipe turns it on as the paper describes:
layers 14-27, conv 2x2, ASPECT_RATIO_2048 buckets, pe_interpolation 4.0, warmup 100, CAME lr 2e-5, from the 2K-MS
weights with the new `compress` parameters at their average init (`kv_compress_missing`). Official batch 4 per GPU
("48"); `data.batch_size` is the GLOBAL batch, lr = 2e-5 * sqrt(batch / 256).

Train (every host of the slice):
  python -m pixart_jax.train --config configs/pixart_sigma_2k_ms_kv.py \
      --workdir gs://BUCKET/runs/sigma2kkv --config.data.dir gs://BUCKET/data/sigma2k
CPU smoke run:
  python -m pixart_jax.train --config configs/pixart_sigma_2k_ms_kv.py:smoke --workdir /tmp/sigma2kkv_smoke
"""
from pixart_jax.train import config_defaults as common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config(preset="sigma-xl2-2k-ms-kv", table="2048", batch_size=128, warmup=100)
  c.steps = 10_000
  c.init_from = "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"
  if arg.smoke:
    common.smoke(c, kv=True)
    c.init_from = None
  return c
