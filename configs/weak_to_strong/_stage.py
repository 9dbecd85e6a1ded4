"""Shared helper of the weak-to-strong recipes (imported by file path; not a recipe itself).

`stage(...)` builds a stage config from `common.base_config`; `smoke=True` shrinks it to a CPU run with the tiny
preset at a stage-specific latent size (256 px -> 4, 512 -> 8, 1024 -> 16, 2K -> 32 latent pixels) and keeps the
stage's PE interpolation, so the chain of smoke stages exercises the same loading rules as the real one.
"""
from pixart_jax.train import config_defaults as common

# Smoke latent sizes per stage resolution (tiny preset; image_size = 8 * sample_size).
SMOKE_SIZE = {256: 4, 512: 8, 1024: 16, 2048: 32}


def stage(*, preset: str, table, batch_size: int, warmup: int, lr: float, steps: int, res: int, interpolation: float,
          init_from, arg, kv: bool = False):
  c = common.base_config(preset=preset, table=table, batch_size=batch_size, warmup=warmup, lr=lr,
                         interpolation=interpolation)
  c.steps = steps
  c.init_from = init_from
  if arg.smoke:
    common.smoke(c, kv=kv)
    c.model.overrides.sample_size = SMOKE_SIZE[res]
    c.model.overrides.image_size = 8 * SMOKE_SIZE[res]
    c.model.overrides.interpolation_scale = interpolation
    c.data.batch_size = 8
    c.steps, c.ckpt_every, c.log_every = 2, 2, 1
    c.init_from = None
  if arg.init_from:
    c.init_from = arg.init_from
  return c


def load_common():
  return common
