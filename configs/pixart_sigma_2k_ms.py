r"""PixArt-Sigma XL/2 at 2K, multi-aspect, no KV compression (the official 2K config as shipped, docs/ARCHITECTURE.md §3.3, §5.1).

The official `PixArt_sigma_xl2_img2K_internalms_kvcompress.py` sets kv_compress=False, so it trains this model:
ASPECT_RATIO_2048 buckets, pe_interpolation 4.0, warmup 100, CAME lr 2e-5, starting from the 1024 px weights.
Official batch 4 per GPU; `data.batch_size` is the GLOBAL batch, lr = 2e-5 * sqrt(batch / 256).

Mesh (TPU compiler, bench/results/tpu_verdicts.md): with the default mesh (fsdp over every chip) and splash
attention one example per chip needs 4.5 GiB per chip on a v5p-8 host (4 chips: 1.1 GiB weights + CAME state,
3.2 GiB temporaries), so a v5p-8 host trains 2K; the global batch of 128 needs about 5 v5p chips' worth of
activations by a linear estimate (~26 examples per chip), i.e. a v5p-16 slice, or a v5p-8 host with
--config.grad_accum=2. At 2K (16,384 tokens) --config.mesh="(('fsdp',-1),('sequence',2))" splits the tokens
when activations do not fit (smaller chips).

Train (every host of the slice):
  python -m pixart_jax.train --config configs/pixart_sigma_2k_ms.py \
      --workdir gs://BUCKET/runs/sigma2k --config.data.dir gs://BUCKET/data/sigma2k
CPU smoke run:
  python -m pixart_jax.train --config configs/pixart_sigma_2k_ms.py:smoke --workdir /tmp/sigma2k_smoke
"""
from pixart_jax.train import config_defaults as common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config(preset="sigma-xl2-2k-ms", table="2048", batch_size=128, warmup=100)
  c.steps = 10_000
  c.init_from = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
  if arg.smoke:
    common.smoke(c)
    c.init_from = None
  return c
