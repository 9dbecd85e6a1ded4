r"""Weak-to-strong stage: upscale_10243

Start: the previous stage's training workdir (`--config.init_from WORKDIR`: its newest checkpoint, the EMA if
the run kept one, else the params), loaded into THIS config by the documented non-strict rules (`convert.ours`):
upscale_10244

Chain (README.md): vae_adapt_256 -> upscale_512 -> upscale_1024 -> {upscale_2k, kv_compress_1024}

  python -m pixart_jax.train --config configs/weak_to_strong/upscale_1024.py \
      --workdir gs://B/w2s/1024 --config.data.dir gs://B/data/1024 --config.init_from gs://B/w2s/512
CPU smoke run (from the previous smoke stage's workdir):
  python -m pixart_jax.train --config configs/weak_to_strong/upscale_1024.py:smoke,init_from=/tmp/w2s_512 --workdir /tmp/w2s_1024
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_w2s_stage", pathlib.Path(__file__).with_name("_stage.py"))
_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage)


def get_config(arg=None):
  arg = _stage.load_common().parse_arg(arg, smoke=False, init_from="")
  return _stage.stage(preset="sigma-xl2-1024-ms", table="1024", batch_size=256, warmup=1000, lr=1e-5, steps=5_000, res=1024,
                      interpolation=2.0, init_from=None, arg=arg, kv=False)
