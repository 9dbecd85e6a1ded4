"""LoRA fine-tuning on the same trainer (`config.lora`: None, or rank / alpha / targets / rslora).

With `config.lora` set, `train_and_evaluate` trains adapters only:
  * the base weights come from `config.init_from` (any source `convert.dit.load_transformer` reads) and stay
    frozen: they are an extra (sharded, never donated) argument of the compiled step, not part of the state;
  * `TrainState.params` is the adapter tree {"stages-0-attn-q-kernel": {"a": (L, in, r), "b": (L, r, out)}},
    so the optimizer state, the EMA and the checkpoints cover the adapters only (the checkpoint's config item
    carries `lora`);
  * the step applies `lora.apply_lora` inside the loss (merge on the fly), so gradients flow to A and B only;
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


def initial_state(config, spec: state_lib.ModelSpec, tx, ckpt, mesh, rules, iterator, cfg: lora.LoraConfig):
  """(state, shardings, source, frozen base params, their shardings): checkpoint -> fresh adapters (B = 0)."""
  from pixart_jax.convert.dit import kv_compress_missing, load_transformer

  if not config.init_from:
    raise ValueError("LoRA fine-tuning (config.lora) needs config.init_from: the base weights to adapt")
  if config.sample.every:
    raise ValueError("the sampling grid (sample.every > 0) is not supported with config.lora yet: set "
                     "sample.every=0 and sample from `lora.merge_lora(base, *lora.load_lora(WORKDIR/lora))`")
  model = load_transformer(config.init_from, config=spec.cfg, dtype=spec.dtype, param_dtype=spec.param_dtype,
                           mesh=mesh, rules=rules, remat=spec.remat, scan=spec.scan,
                           allow_missing=kv_compress_missing if spec.cfg.kv_compress_layers else None)
  _, base = nnx.split(model, nnx.Param)
  base_shardings = state_shardings(base, mesh, rules)
  init_key, train_rng = state_lib.split_key(config.seed)
  shapes = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(base)}
  build = functools.partial(_fresh, shapes=shapes, cfg=cfg, tx=tx, ema=config.ema.rate is not None)
  abstract = jax.eval_shape(build, init_key, train_rng)
  shardings = state_lib.shardings_of(abstract, mesh, rules)
  target = state_lib.with_shardings(abstract, shardings)
  resumed = ckpt.resume(target, iterator)
  if resumed is not None:
    return resumed[0], shardings, f"checkpoint {resumed[1]} (LoRA)", base, base_shardings
  state = jax.jit(build, out_shardings=shardings)(init_key, train_rng)
  return state, shardings, f"LoRA rank {cfg.rank} on init_from {config.init_from}", base, base_shardings


def _fresh(init_key, train_rng, *, shapes, cfg, tx, ema):
  adapters = to_state(lora.init_lora(shapes, cfg, init_key))
  return state_lib.state_from_params(adapters, train_rng, tx=tx, ema=ema)


def compile_step(fn: Callable, cfg: lora.LoraConfig, state, shardings, abstract_batch, null, base, base_shardings,
                 mesh) -> Callable:
  """`fn` (make_train_step's) with the LoRA hook, compiled for one bucket; returns `(state, batch, null) -> ...`."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = functools.partial(fn, params_fn=params_fn(cfg))
  jitted = jax.jit(lambda s, b, n, f: step(s, b, n, frozen=f),
                   in_shardings=(shardings, {k: v.sharding for k, v in abstract_batch.items()}, replicated,
                                 base_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  compiled = jitted.lower(state, abstract_batch, null, base).compile()
  return lambda s, b, n: compiled(s, b, n, base)


def export_adapters(state, cfg: lora.LoraConfig, path) -> Any:
  """Writes the state's adapters (the EMA's if kept) with `lora.save_lora`; returns the directory."""
  tree = state.ema if state.ema is not None else state.params
  adapters = {p: {k: jax.device_get(v) for k, v in ad.items()} for p, ad in from_state(tree).items()}
  return lora.save_lora(adapters, cfg, path)
