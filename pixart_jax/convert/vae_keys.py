"""AutoencoderKL weights: diffusers keys -> our NNX paths (`vae_keymap`), and `load_vae`.

    vae = load_vae("PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers")      # pipeline: uses vae/
    vae = load_vae("/ckpt/pipeline/vae", dtype=jnp.bfloat16)               # a vae/ directory

Layouts: conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O) (legacy 1x1-conv-shaped attention
weights (O, I, 1, 1) are accepted too); GroupNorm weight -> scale. The mid-block attention accepts both the
current names (`to_q/to_k/to_v/to_out.0`) and the legacy ones (`query/key/value/proj_attn`).
"""
from __future__ import annotations

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert.hub import component_dir, read_config, resolve_local
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, load_into
from pixart_jax.models.vae import AutoencoderKL, VAEConfig
from pixart_jax.parallel.sharding import LOGICAL_RULES

__all__ = ["vae_keymap", "load_vae", "find_vae_dir"]

_NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")
_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
         "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}

_RESNET = r"(?P<layer>norm1|norm2|conv1|conv2|conv_shortcut)"
_PATTERNS = [
    # (regex over the key without its .weight/.bias suffix, path builder)
    (rf"(?P<part>encoder|decoder)\.(?:down|up)_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET}",
     lambda m: (m["part"], "down_blocks" if m["part"] == "encoder" else "up_blocks", int(m["i"]), "resnets",
                int(m["j"]), m["layer"])),
    (r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv",
     lambda m: ("encoder", "down_blocks", int(m["i"]), "downsampler", "conv")),
    (r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv",
     lambda m: ("decoder", "up_blocks", int(m["i"]), "upsampler", "conv")),
    (rf"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d+)\.{_RESNET}",
     lambda m: (m["part"], "mid_block", "resnets", int(m["j"]), m["layer"])),
    (r"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<layer>group_norm|to_q|to_k|to_v|to_out\.0|query|key|"
     r"value|proj_attn)",
     lambda m: (m["part"], "mid_block", "attention", _ATTN.get(m["layer"], m["layer"]))),
    (r"(?P<part>encoder|decoder)\.(?P<layer>conv_in|conv_norm_out|conv_out)",
     lambda m: (m["part"], m["layer"])),
    (r"(?P<layer>quant_conv|post_quant_conv)", lambda m: (m["layer"],)),
]
_COMPILED = [(re.compile(p), f) for p, f in _PATTERNS]


def _conv(a: np.ndarray) -> np.ndarray:
  """(O, I, kh, kw) -> (kh, kw, I, O)."""
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a


def _linear(a: np.ndarray) -> np.ndarray:
  """(O, I) or legacy (O, I, 1, 1) -> (I, O)."""
  if a.ndim == 4 and a.shape[2:] == (1, 1):
    a = a[:, :, 0, 0]
  return a.T


def vae_keymap(key: str) -> list[Put] | None:
  """diffusers AutoencoderKL state-dict key -> [Put] into our flat NNX paths; None for an unknown key."""
  stem, _, leaf = key.rpartition(".")
  if leaf not in ("weight", "bias"):
    return None
  for pattern, build in _COMPILED:
    m = pattern.fullmatch(stem)
    if m is None:
      continue
    path = build(m)
    module = path[-1]
    if leaf == "bias":
      return [Put(path + ("bias",))]
    if module in _NORMS:
      return [Put(path + ("scale",))]
    if module in ("to_q", "to_k", "to_v", "to_out"):
      return [Put(path + ("kernel",), fn=_linear)]
    return [Put(path + ("kernel",), fn=_conv)]
  return None


def find_vae_dir(path: pathlib.Path) -> pathlib.Path:
  """A pipeline dir (with `vae/`) or a vae dir -> the dir holding the VAE's config.json."""
  return component_dir(path, "vae", "VAE")


def _weights_path(vae_dir: pathlib.Path) -> pathlib.Path:
  """The diffusers weight file(s) of a vae dir; other files (e.g. an original-format sdxl_vae.safetensors) are
  ignored when `diffusion_pytorch_model.*` is present."""
  for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
               "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin"):
    if (vae_dir / name).is_file():
      return vae_dir / name
  return vae_dir


def load_vae(src: str | os.PathLike, *, config: VAEConfig | None = None, dtype=jnp.float32, param_dtype=None,
             mesh: jax.sharding.Mesh | None = None, rules=LOGICAL_RULES, progress: bool = False) -> AutoencoderKL:
  """Loads a diffusers-format AutoencoderKL into our NNX model (built abstractly, then filled; strict).

  src: a `vae/` dir, a pipeline dir (its `vae/` subfolder is used) or a Hub id (`org/name[/vae]`).
  config: overrides the dir's config.json. dtype: compute dtype; param_dtype: storage dtype (default: dtype).
  mesh: when given, parameters are placed straight into their shardings (the VAE is replicated by `rules`).
  Raises WeightLoadError naming every unexpected / missing / mis-shaped key.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  local = resolve_local(src, allow_patterns=["vae/config.json", "vae/diffusion_pytorch_model*", "config.json",
                                             "diffusion_pytorch_model*"])
  vae_dir = find_vae_dir(local)
  config = config or read_config(vae_dir, VAEConfig.from_hf_config)
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  with open_tensors(_weights_path(vae_dir)) as source:
    return load_into(abstract, source, vae_keymap, mesh=mesh, rules=rules, progress=progress)
