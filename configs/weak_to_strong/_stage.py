"""The weak-to-strong recipes' one source (read by path; not a recipe itself): the stage table and `recipe(name)`,
which gives each configs/weak_to_strong/<name>.py its docstring and `get_config`.

`get_config(arg)` builds the stage from `common.base_config`; `:smoke` shrinks it to a CPU run with the tiny
preset at a stage-specific latent size (256 px -> 4, 512 -> 8, 1024 -> 16, 2K -> 32 latent pixels) and keeps the
stage's PE interpolation, so the chain of smoke stages exercises the same loading rules as the real one;
`init_from=DIR` (in the arg) sets the weights to start from.
"""
import dataclasses
import textwrap

from pixart_jax.train import config_defaults as common

# Smoke latent sizes per stage resolution (tiny preset; image_size = 8 * sample_size).
SMOKE_SIZE = {256: 4, 512: 8, 1024: 16, 2048: 32}
CHAIN = "vae_adapt_256 -> upscale_512 -> upscale_1024 -> {upscale_2k, kv_compress_1024}"
PE_RULE = ("the PE interpolation / sample size change is a config change only (the sin-cos position embedding is "
           "recomputed, never stored)")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: the model preset and recipe numbers, what it changes (`title`; None: the resolution up-scale from
  the previous stage) and by which rule it loads, its workdir / data names in the examples, and the stage it starts
  from (None: a converted PixArt-alpha checkpoint)."""
  preset: str
  table: str | None
  batch_size: int
  warmup: int
  lr: float
  steps: int
  res: int
  interpolation: float
  run: str
  prev: str | None
  title: str | None = None
  rule: str = PE_RULE
  kv: bool = False

  @property
  def data(self) -> str:
    return f"sigma{self.res // 1024}k" if self.res > 1024 else f"sigma{self.res}"


def _upscale(preset: str, res: int, *, batch_size: int, lr: float, steps: int, prev: str, run: str) -> Stage:
  """A resolution up-scale: multi-aspect buckets of `res`, PE interpolation res / 512 (the official rule)."""
  return Stage(preset, str(res), batch_size, 1000, lr, steps, res, res / 512, run=run, prev=prev)


STAGES = {
    "vae_adapt_256": Stage(
        "sigma-xl2-256", None, 1024, 1000, 2e-5, 8_000, 256, 0.5, run="256", prev=None,
        title="VAE adaptation at 256 px (docs/ARCHITECTURE.md §5.7: PixArt-alpha 256 -> Sigma data). Train on "
        "SDXL-VAE latents and 300-token T5 captions (`pixart_jax.prepare` with the "
        "`pixart_sigma_sdxlvae_T5_diffusers` encoders); same architecture, PE interpolation 0.5",
        rule="the micro-condition embedders (csize / ar) of a PixArt-alpha checkpoint are dropped"),
    "upscale_512": _upscale("sigma-xl2-512-ms", 512, batch_size=512, lr=2e-5, steps=10_000, prev="vae_adapt_256",
                            run="512"),
    "upscale_1024": _upscale("sigma-xl2-1024-ms", 1024, batch_size=256, lr=1e-5, steps=5_000, prev="upscale_512",
                             run="1024"),
    "upscale_2k": _upscale("sigma-xl2-2k-ms", 2048, batch_size=64, lr=2e-5, steps=5_000, prev="upscale_1024",
                           run="2k"),
    "kv_compress_1024": Stage(
        "sigma-xl2-1024-ms-kv", "1024", 256, 500, 1e-5, 5_000, 1024, 2.0, run="1024kv", prev="upscale_1024",
        kv=True, title="KV compression at 1024 px: self-attention keys / values of layers 14-27 compressed 2x2 "
        "(docs/ARCHITECTURE.md §3)",
        rule="the new `compress` parameters, absent from the previous stage, start at the Conv-average init: kernel "
        "1/R^2, bias 0, LayerNorm (1, 0) (`convert.ours.kv_compress_missing`)"),
}


def _fill(text: str) -> str:
  return textwrap.fill(text, width=116, break_on_hyphens=False)


def _doc(name: str, s: Stage) -> str:
  if s.prev is None:
    start = ("a PixArt-alpha 256 px checkpoint (SD1.5-VAE latents, 120-token T5) converted to Orbax "
             "(`python -m pixart_jax.convert --source PixArt-XL-2-256x256.pth --config sigma-xl2-256 --out "
             "ckpt/alpha256`)")
    init_from, smoke_from, smoke_note = "gs://B/ckpt/alpha256", "DIR", "the test starts it from a tiny alpha-style " \
        "Orbax dir with micro-conditions"
  else:
    start = ("the previous stage's training workdir (`--config.init_from WORKDIR`: its newest checkpoint, the EMA if "
             "the run kept one, else the params)")
    init_from, smoke_from = f"gs://B/w2s/{STAGES[s.prev].run}", f"/tmp/w2s_{STAGES[s.prev].run}"
    smoke_note = "from the previous smoke stage's workdir"
  recipe = (f"Recipe: preset {s.preset}, {s.steps:,} steps, CAME lr {s.lr:g} (at batch 256; sqrt rule), warmup "
            f"{s.warmup}, global batch {s.batch_size}" + ("" if s.table is None else f", bucket table {s.table}") + ".")
  start = f"Start: {start}, loaded into THIS config by the documented non-strict rules (`convert.ours`): {s.rule}."
  size = f"{s.res} px" if s.res <= 1024 else f"{s.res // 1024}K"
  title = s.title or (f"{size} multi-aspect (ASPECT_RATIO_{s.table} buckets), PE interpolation "
                      f"{STAGES[s.prev].interpolation:.1f} -> {s.interpolation:.1f}")
  return f"""{_fill(f"Weak-to-strong stage `{name}`: {title}.")}

{_fill(recipe)}
{_fill(start)}

Chain (README.md): {CHAIN}

  python -m pixart_jax.train --config configs/weak_to_strong/{name}.py \\
      --workdir gs://B/w2s/{s.run} --config.data.dir gs://B/data/{s.data} --config.init_from {init_from}
CPU smoke run ({smoke_note}):
  python -m pixart_jax.train --config configs/weak_to_strong/{name}.py:smoke,init_from={smoke_from} \\
      --workdir /tmp/w2s_{s.run}
"""


def recipe(name: str):
  """(docstring, get_config) of the stage `name`."""
  s = STAGES[name]

  def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False, init_from="")
    c = common.base_config(preset=s.preset, table=s.table, batch_size=s.batch_size, warmup=s.warmup, lr=s.lr,
                           interpolation=s.interpolation)
    c.steps = s.steps
    c.init_from = None
    if arg.smoke:
      common.smoke(c, kv=s.kv)
      c.model.overrides.sample_size = SMOKE_SIZE[s.res]
      c.model.overrides.image_size = 8 * SMOKE_SIZE[s.res]
      c.model.overrides.interpolation_scale = s.interpolation
      c.data.batch_size = 8
      c.steps, c.ckpt_every, c.log_every = 2, 2, 1
    if arg.init_from:
      c.init_from = arg.init_from
    return c

  return _doc(name, s), get_config
