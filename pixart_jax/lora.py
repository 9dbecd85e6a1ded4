"""LoRA for the PixArt-Sigma DiT: adapters chosen by pattern, trained on the same trainer, merged, saved, and
loaded from the common PEFT / diffusers layouts.

An adapter on a kernel W (in, out) — or a stacked kernel (L, in, out) of a scanned stage — is a pair
A (…, in, r), B (…, r, out) with B = 0 at init, so the adapted model starts equal to the base model:
    W' = W + scale · A @ B,   scale = alpha / r   (alpha / sqrt(r) with rsLoRA).
`apply_lora` builds W' for the targeted kernels ("merge on the fly"): x W' = x W + scale · (x A) B exactly, so the
base modules need no change and a train step differentiates with respect to the adapters only.

Target patterns are regular expressions over our parameter paths joined with "." (e.g.
`stages.0.attn.q.kernel`); `DIFFUSERS_TARGETS` maps PEFT's usual module names (to_q, to_k, …) to ours.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert import dit_keys
from pixart_jax.models.config import DiTConfig

Path = tuple
Adapters = dict[Path, dict[str, jax.Array]]  # path of a kernel -> {"a": (..., in, r), "b": (..., r, out)}

ATTENTION_TARGETS = (r".*\.attn\.(q|k|v|out)\.kernel", r".*\.cross_attn\.(q|k|v|out)\.kernel")
DIFFUSERS_TARGETS = {  # PEFT target_modules names used with diffusers' PixArtTransformer2DModel -> our regexes
    "to_q": r".*attn\.q\.kernel", "to_k": r".*attn\.k\.kernel", "to_v": r".*attn\.v\.kernel",
    "to_out.0": r".*attn\.out\.kernel", "proj": r".*mlp\.fc[12]\.kernel", "ff.net.0.proj": r".*mlp\.fc1\.kernel",
    "ff.net.2": r".*mlp\.fc2\.kernel", "proj_out": r"final\.linear\.kernel",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 16
  alpha: float = 16.0
  targets: tuple[str, ...] = ATTENTION_TARGETS
  rslora: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _name(path: Path) -> str:
  return ".".join(str(p) for p in path)


def flat_params(model_or_state) -> dict[Path, jax.Array]:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return {tuple(p): (v.get_value() if isinstance(v, nnx.Variable) else v) for p, v in nnx.to_flat_state(state)}


def select_targets(params: Mapping[Path, jax.Array], cfg: LoraConfig) -> list[Path]:
  """Kernel paths (2-D, or 3-D stacked) whose dotted name fully matches one of the patterns."""
  pats = [re.compile(p) for p in cfg.targets]
  out = [p for p, v in params.items()
         if p[-1] == "kernel" and v.ndim in (2, 3) and any(r.fullmatch(_name(p)) for r in pats)]
  if not out:
    raise ValueError(f"no kernel matches the LoRA target patterns {cfg.targets}")
  return sorted(out, key=_name)


def init_lora(params: Mapping[Path, jax.Array], cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> Adapters:
  """A ~ N(0, 1/r) (PEFT's default is Kaiming-uniform; any A works since B = 0), B = 0."""
  adapters: Adapters = {}
  for i, path in enumerate(select_targets(params, cfg)):
    w = params[path]
    *lead, din, dout = w.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, din, cfg.rank), dtype) / math.sqrt(cfg.rank)
    adapters[path] = {"a": a, "b": jnp.zeros((*lead, cfg.rank, dout), dtype)}
  return adapters


def delta(adapter: Mapping[str, jax.Array], scale: float) -> jax.Array:
  """scale · A @ B, (…, in, out) float32."""
  return scale * jnp.einsum("...ir,...ro->...io", adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))


def apply_lora(params: Mapping[Path, jax.Array], adapters: Adapters, cfg: LoraConfig) -> dict[Path, jax.Array]:
  """Flat params with W + scale · A @ B on every adapted kernel (differentiable in the adapters)."""
  out = dict(params)
  for path, ad in adapters.items():
    if path not in out:
      raise KeyError(f"LoRA adapter for {_name(path)} has no matching parameter")
    w = out[path]
    out[path] = (w.astype(jnp.float32) + delta(ad, cfg.scale)).astype(w.dtype)
  return out


def merge_lora(model: nnx.Module, adapters: Adapters, cfg: LoraConfig) -> nnx.Module:
  """Writes W + scale · A @ B into the model's kernels (in place); returns the model."""
  state = nnx.state(model, nnx.Param)
  merged = apply_lora(flat_params(state), adapters, cfg)
  for p, v in nnx.to_flat_state(state):
    if tuple(p) in adapters:
      v.set_value(merged[tuple(p)])
  return model


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def save_lora(adapters: Adapters, cfg: LoraConfig, path: str | os.PathLike) -> pathlib.Path:
  """Adapter weights only: `adapters.safetensors` (keys `<path>.lora_a` / `.lora_b`) + `lora_config.json`."""
  from pixart_jax.convert.writers import replace_atomically, write_safetensors

  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for p, ad in adapters.items():
    tensors[f"{_name(p)}.lora_a"] = np.asarray(ad["a"])
    tensors[f"{_name(p)}.lora_b"] = np.asarray(ad["b"])
  write_safetensors(out / "adapters.safetensors", tensors)
  text = json.dumps(dataclasses.asdict(cfg), indent=2)
  replace_atomically(out / "lora_config.json", lambda f: f.write(text), mode="w")
  return out


def _parse_path(name: str) -> Path:
  return tuple(int(s) if s.isdigit() else s for s in name.split("."))


def load_lora(path: str | os.PathLike) -> tuple[Adapters, LoraConfig]:
  """Reads what `save_lora` wrote."""
  from pixart_jax.convert.sources import open_tensors

  path = pathlib.Path(path)
  from pixart_jax.convert.hub import read_json
  cfg_path = path / "lora_config.json"
  raw = read_json(cfg_path, "LoRA config")
  try:
    cfg = LoraConfig(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]), rslora=raw["rslora"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"{cfg_path} is not a valid LoRA config (needs rank, alpha, targets, rslora): "
                     f"{type(e).__name__}: {e}") from None
  adapters: Adapters = {}
  with open_tensors(path / "adapters.safetensors") as src:
    for key in src.keys():
      name, _, kind = key.rpartition(".")
      adapters.setdefault(_parse_path(name), {})[{"lora_a": "a", "lora_b": "b"}[kind]] = jnp.asarray(src.get(key))
  return adapters, cfg


def save_peft_lora(adapters: Adapters, cfg: LoraConfig, dit_cfg: DiTConfig, path: str | os.PathLike) -> pathlib.Path:
  """Our adapters in the PEFT / diffusers layout for PixArtTransformer2DModel (what `load_peft_lora` reads):
  `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r),
  one pair per layer of a stacked stage, and `adapter_config.json` (r, lora_alpha, use_rslora, the full module
  names as target_modules); `peft.PeftModel.from_pretrained(transformer, path)` loads it."""
  from pixart_jax.convert.writers import replace_atomically, write_safetensors

  where = {(e.path, e.index): e.key[: -len(".weight")] for e in dit_keys.diffusers_table(dit_cfg)
           if e.layout == "linear"}
  tensors, modules = {}, []
  for p, ad in sorted(adapters.items(), key=lambda kv: _name(kv[0])):
    a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
    layers = [(None, a, b)] if a.ndim == 2 else [(j, a[j], b[j]) for j in range(a.shape[0])]
    for j, aj, bj in layers:
      module = where.get((p, j))
      if module is None:
        raise ValueError(f"LoRA adapter on {_name(p)} has no PixArtTransformer2DModel module (diffusers layout)")
      tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(aj.T)
      tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(bj.T)
      modules.append(module)
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  write_safetensors(out / "adapter_model.safetensors", tensors)  # each file replaced atomically
  conf = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora,
          "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
          "init_lora_weights": True, "task_type": None, "base_model_name_or_path": None, "inference_mode": True}
  text = json.dumps(conf, indent=2)
  replace_atomically(out / "adapter_config.json", lambda f: f.write(text), mode="w")
  return out


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.|transformer\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def load_peft_lora(path: str | os.PathLike, dit_cfg: DiTConfig, *, alpha: float | None = None
                   ) -> tuple[Adapters, LoraConfig]:
  """A LoRA in the PEFT / diffusers layout for PixArtTransformer2DModel -> our adapters.

  path: a PEFT adapter dir (adapter_model.safetensors + adapter_config.json) or a `.safetensors` file with keys
  `[transformer.|base_model.model.]transformer_blocks.N.attn1.to_q.lora_A.weight` (r, in) / `lora_B.weight` (out, r).
  alpha: needed for a bare file without adapter_config.json (defaults to the rank, i.e. scale 1).
  Unknown or unpaired keys raise ValueError naming them.
  """
  from pixart_jax.convert.sources import open_tensors

  path = pathlib.Path(path)
  conf = {}
  weights = path
  if path.is_dir():
    from pixart_jax.convert.hub import read_json
    conf = read_json(path / "adapter_config.json", "PEFT adapter config")
    weights = path / "adapter_model.safetensors"
  table = {e.key: e for e in dit_keys.diffusers_table(dit_cfg)}
  pairs: dict[str, dict[str, np.ndarray]] = {}
  bad = []
  with open_tensors(weights) as src:
    for key in src.keys():
      m = _PEFT_KEY.match(key)
      if m is None or f"{m['module']}.weight" not in table:
        bad.append(key)
        continue
      pairs.setdefault(m["module"], {})[m["ab"]] = src.get(key)
  unpaired = sorted(k for k, v in pairs.items() if set(v) != {"A", "B"})
  if bad or unpaired:
    raise ValueError(f"unusable LoRA keys in {weights}: unknown {sorted(bad)}; missing A or B for {unpaired}")
  ranks = {v["A"].shape[0] for v in pairs.values()}
  if len(ranks) != 1:
    raise ValueError(f"LoRA ranks differ across modules: {sorted(ranks)}")
  rank = ranks.pop()
  adapters: Adapters = {}
  stacked: dict[Path, dict[str, dict[int, np.ndarray]]] = {}
  for module, ab in pairs.items():
    e = table[f"{module}.weight"]
    if e.layout != "linear":
      raise ValueError(f"LoRA on {module} ({e.layout} layer) is not supported")
    a, b = ab["A"].T, ab["B"].T  # (in, r), (r, out)
    if e.index is None:
      adapters[e.path] = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    else:
      slot = stacked.setdefault(e.path, {"a": {}, "b": {}})
      slot["a"][e.index], slot["b"][e.index] = a, b
  for p, slot in stacked.items():
    # Layers of a stage without an adapter get a zero adapter (A = 0, B = 0): exactly no change.
    count = dit_cfg.stages()[p[1]][1]
    a0, b0 = next(iter(slot["a"].values())), next(iter(slot["b"].values()))
    a = np.zeros((count, *a0.shape), np.float32)
    b = np.zeros((count, *b0.shape), np.float32)
    for j, v in slot["a"].items():
      a[j] = v
    for j, v in slot["b"].items():
      b[j] = v
    adapters[p] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
  lora_alpha = conf.get("lora_alpha", alpha if alpha is not None else rank)
  targets = tuple(sorted({re.escape(_name(p)) for p in adapters}))
  return adapters, LoraConfig(rank=rank, alpha=float(lora_alpha), targets=targets,
                              rslora=bool(conf.get("use_rslora", False)))
