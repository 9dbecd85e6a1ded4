"""transformers `T5EncoderModel` weights -> our NNX `T5Encoder` (strict, streamed).

Key map (PyTorch `nn.Linear.weight` is (out, in); ours is (in, out), so Linear weights are transposed):

  shared.weight                                          -> embed/embedding            (V, D)
  encoder.embed_tokens.weight   (tied copy of shared)    -> DROPPED when shared.weight is present,
                                                            else read in its place
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                         -> rel_bias/embedding         (NB, H)
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight -> blocks/attn/{q,k,v}/kernel [i]  .T
  encoder.block.{i}.layer.0.SelfAttention.o.weight       -> blocks/attn/o/kernel [i]        .T
  encoder.block.{i}.layer.0.layer_norm.weight            -> blocks/attn_norm/scale [i]
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo}.weight
                                                         -> blocks/ffn/{...}/kernel [i]     .T
  encoder.block.{i}.layer.1.layer_norm.weight            -> blocks/ffn_norm/scale [i]
  encoder.final_layer_norm.weight                        -> final_norm/scale

`[i]` is the index along the stacked `layers` axis. A full encoder-decoder T5 checkpoint (e.g.
google/t5-v1_1-xxl) also loads: its `decoder.*` and `lm_head.weight` keys are explicitly dropped.
Anything else (a relative bias in block i > 0, as UMT5 has, unknown names) is an unexpected key.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.convert.hub import component_dir, read_config, resolve_local
from pixart_jax.convert.sources import open_tensors
from pixart_jax.convert.strict import Put, load_into
from pixart_jax.models.t5 import T5Config, T5Encoder
from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules

__all__ = ["t5_keymap", "t5_drop", "load_t5", "abstract_t5", "find_text_encoder_dir", "read_t5_config"]

_EMBED = ("embed", "embedding")
_REL_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.layer\.([01])\.(.+)\.weight")


def _linear(w):
  """PyTorch Linear (out, in) -> (in, out)."""
  return w.T


# (sub-layer index, module name) -> (our path below the stacked `blocks`, transform)
_PER_LAYER: dict[tuple[str, str], tuple[tuple[str, ...], Callable | None]] = {
    ("0", "SelfAttention.q"): (("attn", "q", "kernel"), _linear),
    ("0", "SelfAttention.k"): (("attn", "k", "kernel"), _linear),
    ("0", "SelfAttention.v"): (("attn", "v", "kernel"), _linear),
    ("0", "SelfAttention.o"): (("attn", "o", "kernel"), _linear),
    ("0", "layer_norm"): (("attn_norm", "scale"), None),
    ("1", "DenseReluDense.wi_0"): (("ffn", "wi_0", "kernel"), _linear),
    ("1", "DenseReluDense.wi_1"): (("ffn", "wi_1", "kernel"), _linear),
    ("1", "DenseReluDense.wi"): (("ffn", "wi", "kernel"), _linear),
    ("1", "DenseReluDense.wo"): (("ffn", "wo", "kernel"), _linear),
    ("1", "layer_norm"): (("ffn_norm", "scale"), None),
}


def t5_keymap(key: str) -> list[Put] | None:
  """Pure map of one transformers T5 encoder key to where it goes in `T5Encoder` (None: unknown)."""
  if key in ("shared.weight", "encoder.embed_tokens.weight"):
    return [Put(_EMBED)]
  if key == _REL_BIAS_KEY:
    return [Put(("rel_bias", "embedding"))]
  if key == "encoder.final_layer_norm.weight":
    return [Put(("final_norm", "scale"))]
  m = _BLOCK_KEY.fullmatch(key)
  if m is None:
    return None
  entry = _PER_LAYER.get((m.group(2), m.group(3)))
  if entry is None:
    return None
  path, fn = entry
  return [Put(("blocks",) + path, index=int(m.group(1)), fn=fn)]


def t5_drop(source_keys: Iterable[str]) -> Callable[[str], bool]:
  """Keys consumed without being written: the tied `encoder.embed_tokens.weight` when
  `shared.weight` is present (transformers ties them; we read `shared.weight`), and the decoder /
  LM head of a full encoder-decoder checkpoint."""
  has_shared = "shared.weight" in set(source_keys)

  def drop(key: str) -> bool:
    if key == "encoder.embed_tokens.weight":
      return has_shared
    return key.startswith("decoder.") or key == "lm_head.weight"

  return drop


def find_text_encoder_dir(path: pathlib.Path) -> pathlib.Path:
  """`path/text_encoder` for a pipeline dir, else `path` itself if it holds a config.json."""
  return component_dir(path, "text_encoder", "T5")


def read_t5_config(text_encoder_dir: str | os.PathLike) -> T5Config:
  """T5Config from a transformers `config.json`; errors name the file and the bad field."""
  return read_config(text_encoder_dir, T5Config.from_hf_config)


def abstract_t5(config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: str = "none") -> T5Encoder:
  """The encoder with ShapeDtypeStruct leaves (no memory allocated)."""
  return nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                          rngs=nnx.Rngs(0)))


def load_t5(src: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
            mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
            config: T5Config | None = None, remat: str = "none", progress: bool = False) -> T5Encoder:
  """Loads a transformers T5 encoder into `T5Encoder`, tensor by tensor (never two full copies).

  src: a `text_encoder/` dir (config.json + safetensors, single or sharded, or a torch .bin), a
    pipeline dir (its `text_encoder/` is used), or a Hub id (downloads only the text encoder).
  dtype: compute dtype; param_dtype: storage dtype (None: same as `dtype`; bf16 halves memory:
    T5-XXL is 4.76e9 params = 9.5 GB in bf16, 19 GB in fp32). Source tensors are converted per tensor.
  mesh/rules: place each parameter directly into its sharding (logical names -> mesh axes).
  config: overrides the config.json.
  Raises WeightLoadError naming every unexpected/missing/mis-shaped key.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  local = resolve_local(src, allow_patterns=["text_encoder/*", "config.json", "model*.safetensors*",
                                             "pytorch_model*.bin*"])
  tdir = find_text_encoder_dir(local if local.is_dir() else local.parent)
  cfg = config or read_t5_config(tdir)
  abstract = abstract_t5(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
  with open_tensors(tdir) as source:
    return load_into(abstract, source, t5_keymap, drop=t5_drop(source.keys()), mesh=mesh,
                     rules=LOGICAL_RULES if rules is None else rules, progress=progress)
