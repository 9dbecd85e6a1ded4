r"""Weak-to-strong stage: upscale_5123

Start: the previous stage's training workdir (`--config.init_from WORKDIR`: its newest checkpoint, the EMA if
the run kept one, else the params), loaded into THIS config by the documented non-strict rules (`convert.ours`):
upscale_5124

Chain (README.md): vae_adapt_256 -> upscale_512 -> upscale_1024 -> {upscale_2k, kv_compress_1024}

  python -m pixart_jax.train --config configs/weak_to_strong/upscale_512.py \
      --workdir gs://B/w2s/512 --config.data.dir gs://B/data/512 --config.init_from gs://B/w2s/256
CPU smoke run (from the previous smoke stage's workdir):
  python -m pixart_jax.train --config configs/weak_to_strong/upscale_512.py:smoke,init_from=/tmp/w2s_256 --workdir /tmp/w2s_512
"""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_w2s_stage", pathlib.Path(__file__).with_name("_stage.py"))
_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage)


def get_config(arg=None):
  arg = _stage.load_common().parse_arg(arg, smoke=False, init_from="")
  return _stage.stage(preset="sigma-xl2-512-ms", table="512", batch_size=512, warmup=1000, lr=2e-5, steps=10_000, res=512,
                      interpolation=1.0, init_from=None, arg=arg, kv=False)
