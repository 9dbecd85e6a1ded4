r"""KV-compression fine-tune at 1024 px (official `PixArt_sigma_xl2_img1024_internalms_kvcompress.py`, docs/ARCHITECTURE.md §3, §5.1).

Self-attention keys/values of the deep half (layers 14-27) are compressed 2x2 by a depthwise conv + LayerNorm.
Weak-to-strong: start from the 1024-MS weights; the new `compress` parameters are absent from that checkpoint and
take their "Conv Avg Init" (kernel 1/R^2, bias 0, LayerNorm 1/0): the documented non-strict loading rule
(`pixart_jax.convert.ours.kv_compress_missing`). Warmup 500, CAME lr 2e-5 (paper: 1e-5), official batch 4 per GPU
("16"); `data.batch_size` is the GLOBAL batch, lr = lr_256 * sqrt(batch / 256).

Train (every host of the slice):
  python -m pixart_jax.train --config configs/pixart_sigma_1024_ms_kv.py \
      --workdir gs://BUCKET/runs/sigma1024kv --config.data.dir gs://BUCKET/data/sigma1024
CPU smoke run:
  python -m pixart_jax.train --config configs/pixart_sigma_1024_ms_kv.py:smoke --workdir /tmp/sigma1024kv_smoke
"""
from pixart_jax.train import config_defaults as common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config(preset="sigma-xl2-1024-ms-kv", table="1024", batch_size=256, warmup=500)
  c.steps = 5_000
  c.init_from = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
  if arg.smoke:
    common.smoke(c, kv=True)
    c.init_from = None
  return c
