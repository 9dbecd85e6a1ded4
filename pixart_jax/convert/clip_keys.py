"""transformers `CLIPModel` weights -> our NNX `CLIPModel` (`clip_keymap`), `read_clip_config` and `load_clip`.

    clip = load_clip("openai/clip-vit-large-patch14")      # a Hub id, or a local CLIPModel directory

Key map (T = text_model | vision_model; PyTorch Linear (out, in) -> ours (in, out)):

  T.embeddings.{token,position}_embedding.weight     -> T/embeddings/{token,position}_embedding/embedding
  vision_model.embeddings.class_embedding            -> vision_model/embeddings/class_embedding
  vision_model.embeddings.patch_embedding.weight     -> vision_model/embeddings/patch_embedding/kernel
                                                        (D, C, p, p) -> (p, p, C, D)
  T.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
                                                     -> T/encoder/layers/self_attn/{..}_proj/{kernel .T, bias} [i]
  T.encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}     -> T/encoder/layers/mlp/fc{1,2}/{kernel .T, bias} [i]
  T.encoder.layers.{i}.layer_norm{1,2}.{weight,bias} -> T/encoder/layers/layer_norm{1,2}/{scale, bias} [i]
  text_model.final_layer_norm, vision_model.{pre_layrnorm,post_layernorm} .{weight,bias} -> .../{scale, bias}
  {text,visual}_projection.weight                    -> {text,visual}_projection/kernel .T
  logit_scale, T.embeddings.position_ids             -> dropped (not needed for embeddings; position_ids is a
                                                        buffer older files saved)

`[i]` is the index along the stacked `layers` axis. Weights are read with `convert.sources.open_tensors`
(model.safetensors, sharded safetensors, or pytorch_model.bin through the safe unpickler).
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.convert.hub import read_config, resolve_local
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, load_into
from pixart_jax.metrics.clip import CLIPConfig, CLIPModel
from pixart_jax.parallel.sharding import LOGICAL_RULES

__all__ = ["clip_keymap", "clip_drop", "read_clip_config", "load_clip", "CLIP_FILES"]

# what a CLIPModel directory needs (weights, config, tokenizer, image processor)
CLIP_FILES = ["config.json", "model*.safetensors*", "pytorch_model*.bin*", "preprocessor_config.json",
              "tokenizer*.json", "vocab.json", "merges.txt", "special_tokens_map.json"]

_TOWER = r"(?P<tower>text_model|vision_model)"
_LAYER = re.compile(_TOWER + r"\.encoder\.layers\.(?P<i>\d+)\.(?P<mod>self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]|"
                    r"layer_norm[12])\.(?P<leaf>weight|bias)")
_NORM = re.compile(r"(?P<mod>text_model\.final_layer_norm|vision_model\.pre_layrnorm|vision_model\.post_layernorm)"
                   r"\.(?P<leaf>weight|bias)")
_EMBED = re.compile(_TOWER + r"\.embeddings\.(?P<table>token_embedding|position_embedding)\.weight")


def _t(a: np.ndarray) -> np.ndarray:
  """Linear (out, in) -> (in, out)."""
  return a.T


def _patch(a: np.ndarray) -> np.ndarray:
  """Conv (D, C, p, p) -> (p, p, C, D)."""
  return a.transpose(2, 3, 1, 0)


def clip_keymap(key: str) -> list[Put] | None:
  """One transformers CLIPModel key -> [Put] into our `CLIPModel` (None: unknown key)."""
  if m := _LAYER.fullmatch(key):
    path = (m["tower"], "encoder", "layers") + tuple(m["mod"].split("."))
    is_norm = m["mod"].startswith("layer_norm")
    if m["leaf"] == "bias":
      return [Put(path + ("bias",), index=int(m["i"]))]
    return [Put(path + ("scale",), index=int(m["i"]))] if is_norm else [Put(path + ("kernel",), int(m["i"]), _t)]
  if m := _NORM.fullmatch(key):
    return [Put(tuple(m["mod"].split(".")) + ("scale" if m["leaf"] == "weight" else "bias",))]
  if m := _EMBED.fullmatch(key):
    return [Put((m["tower"], "embeddings", m["table"], "embedding"))]
  if key == "vision_model.embeddings.class_embedding":
    return [Put(("vision_model", "embeddings", "class_embedding"))]
  if key == "vision_model.embeddings.patch_embedding.weight":
    return [Put(("vision_model", "embeddings", "patch_embedding", "kernel"), fn=_patch)]
  if key in ("text_projection.weight", "visual_projection.weight"):
    return [Put((key.split(".")[0], "kernel"), fn=_t)]
  return None


def clip_drop(key: str) -> bool:
  """The temperature (`logit_scale`) and the `position_ids` buffers of older checkpoints."""
  return key == "logit_scale" or re.fullmatch(_TOWER + r"\.embeddings\.position_ids", key) is not None


def read_clip_config(model_dir: str | os.PathLike) -> CLIPConfig:
  """CLIPConfig from a transformers `config.json`; errors name the file and the bad field."""
  return read_config(model_dir, CLIPConfig.from_hf_config)


def load_clip(src: str | os.PathLike, *, config: CLIPConfig | None = None, dtype=jnp.float32, param_dtype=None,
              precision=jax.lax.Precision.HIGHEST, mesh: jax.sharding.Mesh | None = None, rules=LOGICAL_RULES,
              progress: bool = False) -> CLIPModel:
  """Loads a transformers CLIPModel (a local directory with config.json + weights, or a Hub id) strictly.

  dtype: compute dtype; param_dtype: storage dtype (default: dtype). mesh/rules: parameters are placed
  straight into their shardings (logical names -> mesh axes; `rules=()` replicates everything).
  Raises WeightLoadError naming every unexpected / missing / mis-shaped key.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  local = resolve_local(src, allow_patterns=CLIP_FILES)
  if not (local / "config.json").is_file():
    raise FileNotFoundError(f"{src!r}: no config.json in {local} (expected a transformers CLIPModel directory)")
  config = config or read_clip_config(local)
  abstract = nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                              rngs=nnx.Rngs(0)))
  with open_tensors(local) as source:
    return load_into(abstract, source, clip_keymap, drop=clip_drop, mesh=mesh, rules=rules, progress=progress)
