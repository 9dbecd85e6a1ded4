"""The official PixArt ControlNet checkpoint layout (`ControlPixArtHalf` / `ControlPixArtMSHalf`, official
`diffusion/model/nets/pixart_controlnet.py`) <-> our `models.controlnet.ControlPixArtSigma`.

Official keys (a `state_dict()` of the wrapper):
  base_model.<official PixArt keys>                 the frozen base (bare official keys are accepted too)
  controlnet.{i}.copied_block.<official block keys>  copy i of base block i (fused attn.qkv / cross_attn.kv_linear)
  controlnet.0.before_proj.{weight,bias}             Linear(D, D), block 0 only
  controlnet.{i}.after_proj.{weight,bias}            Linear(D, D)
Ours: ("base_model", ...) as the DiT's own key map, ("controlnet", "blocks", i, ...), ("controlnet", "before_proj"),
("controlnet", "after_proj", i). A file without base keys is a branch only: it loads onto a given base model.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert import dit_keys
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, WeightLoadError, load_into
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.controlnet import ControlBranch, ControlPixArtSigma
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel.sharding import LOGICAL_RULES

BASE = "base_model."
_CTRL_RE = re.compile(r"^controlnet\.(\d+)\.(copied_block|before_proj|after_proj)\.(.+)$")
_LINEAR = dit_keys._LAYOUTS["linear"]


def num_control_blocks(keys) -> int:
  """How many copied blocks a checkpoint holds (0: no control branch)."""
  idx = {int(m.group(1)) for m in map(_CTRL_RE.match, keys) if m and m.group(2) == "after_proj"}
  if idx and idx != set(range(len(idx))):
    raise WeightLoadError(f"control branch blocks {sorted(idx)} are not numbered 0..{len(idx) - 1}")
  return len(idx)


def _branch_put(p: Put, i: int) -> Put:
  """A base-block Put (("stages", s, ...), index j) -> the same tensor into control block i."""
  return Put(("controlnet", "blocks", i) + tuple(p.path[2:]), None, p.fn)


def official_keymap(cfg: DiTConfig, *, with_base: bool = True) -> Callable[[str], list[Put] | None]:
  """Source key -> Puts into a ControlPixArtSigma (with_base) or a bare ControlBranch (paths without the
  "controlnet" prefix: the branch alone, loaded onto a given base)."""
  base_map = dit_keys.official_keymap(cfg)

  def keymap(key: str) -> list[Put] | None:
    m = _CTRL_RE.match(key)
    if m is None:
      if not with_base:
        return None
      puts = base_map(key[len(BASE):] if key.startswith(BASE) else key)
      return None if puts is None else [Put(("base_model",) + tuple(p.path), p.index, p.fn) for p in puts]
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "copied_block":
      puts = base_map(f"blocks.{i}.{rest}")
      out = None if puts is None else [_branch_put(p, i) for p in puts]
    elif part == "before_proj" and i != 0:
      return None
    else:
      leaf = {"weight": ("kernel", _LINEAR[0]), "bias": ("bias", None)}.get(rest)
      if leaf is None:
        return None
      where = ("before_proj",) if part == "before_proj" else ("after_proj", i)
      out = [Put(("controlnet",) + where + (leaf[0],), None, leaf[1])]
    if out is not None and not with_base:
      out = [Put(p.path[1:], p.index, p.fn) for p in out]
    return out

  return keymap


def official_drop(key: str) -> bool:
  return dit_keys.official_drop(key[len(BASE):] if key.startswith(BASE) else key)


def load_controlnet(src: str | os.PathLike, *, base: PixArtSigma | None = None, config: DiTConfig | None = None,
                    dtype=None, param_dtype=None, attention=None, mesh: jax.sharding.Mesh | None = None,
                    rules=LOGICAL_RULES) -> ControlPixArtSigma:
  """Loads an official-layout ControlNet checkpoint (.pth / .safetensors / a folder of them), strictly.

  base: the loaded PixArt-Sigma the branch attaches to; the file must then hold only `controlnet.*` keys (the
    branch, as `export_controlnet` writes it). Without base the file must hold the base keys too and `config`
    names the architecture (dtype / param_dtype / attention: how it runs, `models.spec.ModelSpec`). Every key is
    used (the PE buffer and the null caption are dropped), every weight filled.
  """
  with open_tensors(src) as source:
    keys = list(source.keys())
    n = num_control_blocks(keys)
    if n == 0:
      raise WeightLoadError(f"{src}: no control branch (controlnet.N.after_proj.*) in {len(keys)} keys")
    has_base = any(not k.startswith("controlnet.") for k in keys)
    if base is not None:
      if has_base:
        raise WeightLoadError(f"{src} holds base weights too: load it without base= (config= names the model)")
      pdt = jax.tree.leaves(nnx.state(base, nnx.Param))[0].dtype
      abstract = nnx.eval_shape(lambda: ControlBranch(base, n, dtype=dtype, param_dtype=param_dtype or pdt,
                                                      rngs=nnx.Rngs(0)))
      branch = load_into(abstract, source, official_keymap(base.cfg, with_base=False), mesh=mesh, rules=rules)
      return ControlPixArtSigma(base, branch)
    if config is None:
      raise ValueError(f"{src} holds a whole ControlNet model: pass config= (its DiTConfig)")
    spec = ModelSpec(config, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32,
                     attention=attention)

    def build():
      b = spec.build(nnx.Rngs(0))
      return ControlPixArtSigma(b, ControlBranch(b, n, rngs=nnx.Rngs(1)))

    return load_into(nnx.eval_shape(build), source, official_keymap(config), drop=official_drop, mesh=mesh,
                     rules=rules)


def attach_controlnet(src: str | os.PathLike, base: PixArtSigma, *, mesh: jax.sharding.Mesh | None = None,
                      rules=LOGICAL_RULES) -> ControlPixArtSigma:
  """ControlNet weights for `base`: a branch file attaches to `base`; a whole checkpoint (base keys too) loads with
  `base`'s architecture and dtypes and brings its own base."""
  with open_tensors(src) as source:
    whole = any(not k.startswith("controlnet.") for k in source.keys())
  if not whole:
    return load_controlnet(src, base=base, mesh=mesh, rules=rules)
  pdt = jax.tree.leaves(nnx.state(base, nnx.Param))[0].dtype
  return load_controlnet(src, config=base.cfg, dtype=base.dtype, param_dtype=pdt, attention=base.attention,
                         mesh=mesh, rules=rules)


def _official_block_tensors(cfg: DiTConfig, flat: dict[tuple, np.ndarray], i: int, prefix: str
                            ) -> Iterator[tuple[str, np.ndarray]]:
  """Control block i of `flat` (our branch paths, no "controlnet" prefix) as official block keys."""
  d = {}
  for e in dit_keys.diffusers_table(cfg):
    if e.key.startswith(f"transformer_blocks.{i}.") and e.path[:2] == ("stages", _stage_of(cfg, i)):
      d[e.key[len(f"transformer_blocks.{i}."):]] = dit_keys._LAYOUTS[e.layout][1](
          np.asarray(flat[("blocks", i) + tuple(e.path[2:])]))
  fused = {"attn.qkv": [f"attn1.to_{n}" for n in "qkv"], "cross_attn.kv_linear": [f"attn2.to_{n}" for n in "kv"]}
  inverse = {v: k for k, v in dit_keys._OFFICIAL_BLOCK.items()}
  used = set()
  for off, parts in fused.items():
    for kind in ("weight", "bias"):
      yield f"{prefix}{off}.{kind}", np.concatenate([d[f"{p}.{kind}"] for p in parts])
      used.update(f"{p}.{kind}" for p in parts)
  for key, a in d.items():
    if key in used:
      continue
    mod, _, kind = key.rpartition(".")
    if key == "scale_shift_table":
      yield f"{prefix}scale_shift_table", a
    else:
      yield f"{prefix}{inverse[mod]}.{kind}", a


def _stage_of(cfg: DiTConfig, i: int) -> int:
  for s, (first, count, _) in enumerate(cfg.stages()):
    if first <= i < first + count:
      return s
  raise IndexError(i)


def branch_tensors(branch: ControlBranch, cfg: DiTConfig) -> Iterator[tuple[str, np.ndarray]]:
  """The branch in the official layout: (key, PyTorch-layout float array), `controlnet.*` keys only."""
  flat = {tuple(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(
      nnx.state(branch, nnx.Param))}
  for i in range(branch.num_blocks):
    yield from _official_block_tensors(cfg, flat, i, f"controlnet.{i}.copied_block.")
    if i == 0:
      yield "controlnet.0.before_proj.weight", _LINEAR[1](flat[("before_proj", "kernel")])
      yield "controlnet.0.before_proj.bias", flat[("before_proj", "bias")]
    yield f"controlnet.{i}.after_proj.weight", _LINEAR[1](flat[("after_proj", i, "kernel")])
    yield f"controlnet.{i}.after_proj.bias", flat[("after_proj", i, "bias")]


def export_controlnet(branch: ControlBranch, cfg: DiTConfig, path: str | os.PathLike, *,
                      dtype=np.float32, overwrite: bool = False) -> pathlib.Path:
  """Writes the branch as one safetensors file in the official key layout (`controlnet.*`); `load_controlnet(path,
  base=...)` reads it back. An existing file is refused unless `overwrite` (for a file the caller knows is its
  own); then the new file is written next to it and renamed over it, so a failed write keeps the old one."""
  from pixart_jax.convert.writers import write_safetensors

  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists: ControlNet export does not overwrite a file without overwrite=True")
  path.parent.mkdir(parents=True, exist_ok=True)
  write_safetensors(path, [(k, np.ascontiguousarray(a.astype(dtype))) for k, a in branch_tensors(branch, cfg)],
                    metadata={"format": "pt", "layout": "pixart-controlnet-half", "blocks": str(branch.num_blocks)})
  return path
