"""Load the PixArt-Sigma transformer from released weights, and export it back to the diffusers layout.

Sources: a diffusers `transformer/` directory (safetensors, sharded or not), a whole diffusers pipeline
directory, an official `.pth` (docs/ARCHITECTURE.md §9.1), or a Hub id when online. Loading is strict (every source key
used or on the explicit drop list, every target filled, shapes checked) and streamed (the model is built
abstractly and filled tensor by tensor).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert import dit_keys, orbax_io, ours
from pixart_jax.convert.hub import component_dir, read_config, read_json, resolve_local
from pixart_jax.outputs import claim_output
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import WeightLoadError, load_into
from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.config import PRESETS, DiTConfig, get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.spec import ModelSpec, abstract
from pixart_jax.parallel.sharding import LOGICAL_RULES

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Official .pth names -> presets (PixArt-alpha/PixArt-Sigma on the Hub).
_OFFICIAL_NAMES = {
    r"256x256": "sigma-xl2-256",
    r"512-MS": "sigma-xl2-512-ms",
    r"1024-MS": "sigma-xl2-1024-ms",
    r"2K-MS": "sigma-xl2-2k-ms",
}


# ---------------------------------------------------------------------------------------------------------------
# diffusers config.json <-> DiTConfig
# ---------------------------------------------------------------------------------------------------------------
_REQUIRED = {
    "norm_type": "ada_norm_single",
    "activation_fn": "gelu-approximate",
    "norm_elementwise_affine": False,
    "attention_bias": True,
}


def config_from_diffusers(cfg: dict[str, Any], *, has_micro_keys: bool | None = None) -> DiTConfig:
  """A diffusers `PixArtTransformer2DModel` config dict -> DiTConfig (unsupported values raise, naming them)."""
  bad = {k: cfg[k] for k, v in _REQUIRED.items() if k in cfg and cfg[k] != v}
  if bad:
    raise ValueError(f"unsupported transformer config values {bad}; expected {_REQUIRED}")
  heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
  in_ch = cfg.get("in_channels", 4)
  out_ch = cfg.get("out_channels") or in_ch
  if out_ch not in (in_ch, 2 * in_ch):
    raise ValueError(f"out_channels {out_ch} must be in_channels ({in_ch}) or twice it (learned sigma)")
  sample_size = cfg.get("sample_size", 128)
  scale = cfg.get("interpolation_scale")
  if scale is None:
    scale = max(sample_size // 64, 1)
    log.warning("transformer config has no interpolation_scale; using the diffusers default %s (wrong for the "
                "256 px checkpoint, which needs 0.5)", scale)
  micro = cfg.get("use_additional_conditions")
  if micro is None:  # the first 1024-MS upload lacked the key: decide from the weights when we can
    micro = has_micro_keys if has_micro_keys is not None else sample_size == 128
  if cfg.get("cross_attention_dim", heads * head_dim) != heads * head_dim:
    raise ValueError("cross_attention_dim must equal num_attention_heads * attention_head_dim")
  return DiTConfig(
      depth=cfg.get("num_layers", 28), hidden_size=heads * head_dim, num_heads=heads,
      patch_size=cfg.get("patch_size", 2), in_channels=in_ch, learn_sigma=out_ch == 2 * in_ch,
      caption_channels=cfg.get("caption_channels", 4096), sample_size=sample_size,
      interpolation_scale=float(scale), micro_conditions=bool(micro), norm_eps=cfg.get("norm_eps", 1e-6),
      image_size=sample_size * 8,
      kv_compress_layers=tuple(cfg.get("pixart_jax_kv_compress_layers", ())),
      kv_compress_ratio=cfg.get("pixart_jax_kv_compress_ratio", 2),
      kv_compress_mode=cfg.get("pixart_jax_kv_compress_mode", "conv"),
      qk_norm=cfg.get("pixart_jax_qk_norm", False),
  )


def config_to_diffusers(cfg: DiTConfig) -> dict[str, Any]:
  """DiTConfig -> a diffusers `PixArtTransformer2DModel` config.json dict (extra keys for our extensions)."""
  out = {
      "_class_name": "PixArtTransformer2DModel",
      "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels, "num_layers": cfg.depth, "dropout": 0.0, "norm_num_groups": 32,
      "cross_attention_dim": cfg.hidden_size, "attention_bias": True, "sample_size": cfg.sample_size,
      "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
      "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
      "norm_eps": cfg.norm_eps, "interpolation_scale": cfg.interpolation_scale, "use_additional_conditions":
      cfg.micro_conditions, "caption_channels": cfg.caption_channels, "attention_type": "default",
  }
  if cfg.kv_compress_layers:
    out.update(pixart_jax_kv_compress_layers=list(cfg.kv_compress_layers),
               pixart_jax_kv_compress_ratio=cfg.kv_compress_ratio, pixart_jax_kv_compress_mode=cfg.kv_compress_mode)
  if cfg.qk_norm:
    out["pixart_jax_qk_norm"] = True
  return out


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _preset_from_filename(name: str) -> DiTConfig | None:
  for pat, preset in _OFFICIAL_NAMES.items():
    if re.search(pat, name, re.IGNORECASE):
      return PRESETS[preset]
  return None


def load_transformer(src: str | os.PathLike, *, config: DiTConfig | str | None = None, dtype=jnp.float32,
                     param_dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, rules=LOGICAL_RULES,
                     remat: str = "none", scan: bool = True, attention: AttentionOptions | str | None = None,
                     allow_missing=None, progress: bool = False) -> PixArtSigma:
  """Loads PixArt-Sigma weights into our NNX model.

  src: diffusers `transformer/` dir, a pipeline dir, an official `.pth`, an Orbax dir written by
    `python -m pixart_jax.convert`, a training workdir of ours (newest checkpoint, EMA if kept), or a Hub id.
    Our own checkpoints load into `config` (when given) by the weak-to-strong rules of `convert.ours`.
  config: DiTConfig or preset name; required for a `.pth` whose file name does not identify the checkpoint.
  dtype / param_dtype / remat / scan / attention: how the model runs (`models.spec.ModelSpec`); attention is an
    `AttentionOptions`, a backend name ("xla", "splash", "cudnn") or None (xla).
  mesh: when given, parameters are placed directly into their shardings (`rules` maps logical axes).
  allow_missing: documented non-strict rule for weak-to-strong loading, e.g. new KV-compression layers
    (`convert.ours.kv_compress_missing`) which then take their average init.
  """
  if isinstance(config, str):
    config = get_preset(config)

  def spec(cfg: DiTConfig) -> ModelSpec:
    return ModelSpec(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, scan=scan, attention=attention)

  if orbax_io.is_orbax_dir(src) and config is None:
    return orbax_io.load_transformer_orbax(src, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                                           remat=remat, scan=scan, attention=attention)
  if ours.is_ours(src):  # a training workdir, or an Orbax dir loaded into a (new) config: weak-to-strong rules
    return ours.load_ours(src, spec(config or ours.saved_config(src)), mesh=mesh, rules=rules, progress=progress)
  local = resolve_local(src, allow_patterns=["transformer/*", "*.json", "*.safetensors", "*.pth"])
  if local.is_file() and local.suffix in _TORCH_SUFFIXES:
    cfg = config or _preset_from_filename(local.name)
    if cfg is None:
      raise ValueError(f"cannot tell which PixArt checkpoint {local.name} is: pass config= (a DiTConfig or one of "
                       f"{sorted(PRESETS)})")
    source = open_tensors(local)
    keymap, drop = dit_keys.official_keymap(cfg), dit_keys.official_drop
  else:
    tdir = component_dir(local, "transformer", "transformer") if local.is_dir() else local.parent
    source = open_tensors(tdir)
    has_micro = any("resolution_embedder" in k for k in source.keys())
    cfg = config or read_config(tdir, functools.partial(config_from_diffusers, has_micro_keys=has_micro))
    keymap, drop = dit_keys.diffusers_keymap(cfg), (lambda k: False)
  with source:
    _check_expected_keys(cfg, source.keys(), official=drop is dit_keys.official_drop, allow_missing=allow_missing)
    return load_into(abstract(spec(cfg)), source, keymap, drop=drop, mesh=mesh, rules=rules,
                     allow_missing=allow_missing, init_missing=functools.partial(ours.weak_to_strong_init, cfg),
                     progress=progress)


def _check_expected_keys(cfg: DiTConfig, keys, *, official: bool, allow_missing) -> None:
  """Names the checkpoint keys a model of this config needs but the source lacks (before any loading)."""
  table = dit_keys.diffusers_table(cfg)
  have = set(keys)
  if official:
    have = {d for k in keys for d, _ in (dit_keys.official_to_diffusers(k) or [])}
  missing = [e.key for e in table if e.key not in have and not (allow_missing and allow_missing(e.path))]
  if missing:
    layout = "official (converted to diffusers names)" if official else "diffusers"
    raise WeightLoadError(f"checkpoint lacks {len(missing)} keys this {layout} model needs:\n  " +
                          "\n  ".join(sorted(missing)), missing=sorted(missing))


def flat_targets_values(state) -> list[tuple[tuple, jax.Array]]:
  return [(tuple(k), v.get_value() if isinstance(v, nnx.Variable) else v) for k, v in nnx.to_flat_state(state)]


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------
def export_transformer(model: PixArtSigma, out_dir: str | os.PathLike, *, max_shard_bytes: int = 10 * 2**30,
                       dtype=np.float32, overwrite: bool = False) -> pathlib.Path:
  """Writes a diffusers-format `transformer/` directory (config.json + safetensors) from our model. `out_dir` must
  be new, empty, or an earlier output of ours with `overwrite=True` (`pixart_jax.outputs.claim_output`)."""
  out = claim_output(out_dir, tool="convert", overwrite=overwrite)
  return write_transformer_files(model, out, max_shard_bytes=max_shard_bytes, dtype=dtype)


def write_transformer_files(model: PixArtSigma, out: pathlib.Path, *, max_shard_bytes: int = 10 * 2**30,
                            dtype=np.float32) -> pathlib.Path:
  """`export_transformer` into a folder already claimed by the caller (e.g. the pipeline export's transformer/)."""
  from pixart_jax.convert.writers import save_safetensors_sharded

  out.mkdir(parents=True, exist_ok=True)
  flat = {tuple(k): v for k, v in flat_targets_values(nnx.state(model, nnx.Param))}

  def tensors():
    for key, arr in dit_keys.export_tensors(model.cfg, _LazyHost(flat)):
      yield key, arr.astype(dtype)

  save_safetensors_sharded(tensors(), out, prefix="diffusion_pytorch_model", max_shard_bytes=max_shard_bytes)
  with open(out / "config.json", "w") as f:
    json.dump(config_to_diffusers(model.cfg), f, indent=2)
  return out


class _LazyHost(dict):
  """Maps path -> host numpy array, fetching each device array only when asked (bounded host memory)."""

  def __init__(self, flat: dict[tuple, jax.Array]):
    super().__init__()
    self._flat = flat

  def __getitem__(self, key):
    return np.asarray(jax.device_get(self._flat[key]))
