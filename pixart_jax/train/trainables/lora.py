"""LoRA fine-tuning (`config.lora`: None, or rank / alpha / targets / rslora): adapters are trained, the base is not.

  * the base weights come from `config.init_from` (any source `convert.dit.load_transformer` reads) and stay
    frozen: they are the frozen input of the compiled step (sharded, never donated), not part of the state;
  * `TrainState.params` is the adapter tree {"stages-0-attn-q-kernel": {"a": (L, in, r), "b": (L, r, out)}},
    so the optimizer state, the EMA and the checkpoints cover the adapters only (the checkpoint's config item
    carries `lora`);
  * the params function applies `lora.apply_lora` inside the loss (merge on the fly), so gradients flow to A and B
    only;
  * at the end of the run the adapters are written with `lora.save_lora` to `<workdir>/lora/`;
    `lora.merge_lora(load_transformer(init_from), *lora.load_lora(...))` gives the full fine-tuned model.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx

from pixart_jax import lora
from pixart_jax.parallel.sharding import state_shardings
from pixart_jax.train import state as state_lib
from pixart_jax.train.trainable import BuildFn, Context, Trainable, load_init_from

SEP = "-"  # adapter keys in the state: path parts joined with "-" (no "." or "/": Orbax tree keys)


def lora_config(config) -> lora.LoraConfig | None:
  """config.lora -> LoraConfig (None when the field is absent, None, or has rank None)."""
  c = config.get("lora") if hasattr(config, "get") else None
  if c is None or c.get("rank") is None:  # absent, None, or a placeholder block with rank None: no LoRA
    return None
  kw = {k: c[k] for k in ("rank", "alpha", "rslora") if c.get(k) is not None}
  if c.get("targets"):
    kw["targets"] = tuple(c["targets"])
  out = lora.LoraConfig(**kw)
  if out.rank < 1:
    raise ValueError(f"lora.rank must be >= 1, got {out.rank}")
  return out


def to_state(adapters: lora.Adapters) -> dict:
  return {SEP.join(map(str, p)): dict(ad) for p, ad in adapters.items()}


def from_state(tree: dict) -> lora.Adapters:
  return {tuple(int(s) if s.isdigit() else s for s in k.split(SEP)): ad for k, ad in tree.items()}


def params_fn(cfg: lora.LoraConfig) -> Callable[[dict, Any], Any]:
  """(adapter tree, base nnx.State) -> the nnx.State of W + scale A B on the targeted kernels."""

  def fn(adapters: dict, base):
    flat = nnx.to_flat_state(base)
    merged = lora.apply_lora({tuple(p): v.get_value() for p, v in flat}, from_state(adapters), cfg)
    return nnx.from_flat_state([(p, v.replace(merged[tuple(p)])) for p, v in flat])

  return fn


def _fresh(init_key, train_rng, *, shapes, cfg, tx, ema):
  adapters = to_state(lora.init_lora(shapes, cfg, init_key))
  return state_lib.state_from_params(adapters, train_rng, tx=tx, ema=ema)


def export_adapters(state, cfg: lora.LoraConfig, path) -> Any:
  """Writes the state's adapters (the EMA's if kept) with `lora.save_lora`; returns the directory."""
  tree = state.ema if state.ema is not None else state.params
  adapters = {p: {k: jax.device_get(v) for k, v in ad.items()} for p, ad in from_state(tree).items()}
  return lora.save_lora(adapters, cfg, path)


class LoraTrainable(Trainable):
  """Adapters on the frozen `init_from` weights. Start: fresh adapters (B = 0: the model starts as the base)."""

  label = "LoRA"

  @classmethod
  def wanted(cls, config) -> bool:
    return lora_config(config) is not None

  def __init__(self, config, spec):
    super().__init__(config, spec)
    self.cfg = lora_config(config)
    if not config.init_from:
      raise ValueError("LoRA fine-tuning (config.lora) needs config.init_from: the base weights to adapt")
    if config.sample.every:
      raise ValueError("the sampling grid (sample.every > 0) is not supported with config.lora yet: set "
                       "sample.every=0 and sample from `lora.merge_lora(base, *lora.load_lora(WORKDIR/lora))`")
    self.params_fn = params_fn(self.cfg)
    self._base = self._base_shardings = None

  def build_fn(self, ctx: Context) -> BuildFn:
    """Loads the base weights (the frozen input): the adapters' shapes follow the targeted kernels."""
    self._base = load_init_from(ctx)
    self._base_shardings = state_shardings(self._base, ctx.mesh, ctx.rules)
    shapes = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(self._base)}
    return functools.partial(_fresh, shapes=shapes, cfg=self.cfg, tx=ctx.tx, ema=self.config.ema.rate is not None)

  def start(self, ctx: Context, build: BuildFn, shardings, init_key, train_rng):
    state = jax.jit(build, out_shardings=shardings)(init_key, train_rng)
    return state, f"LoRA rank {self.cfg.rank} on init_from {self.config.init_from}"

  def frozen(self):
    return self._base, self._base_shardings

  def export(self, state, workdir):
    return export_adapters(state, self.cfg, workdir / "lora")
