"""User API: prompts -> T5 caption embeddings and masks (tokenizer + NNX T5 encoder).

    enc = TextEncoder.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", dtype=jnp.bfloat16)
    embeds, mask = enc.encode_prompts(["a cat", ""])   # (2, 300, 4096) float32, (2, 300) int32

The forward pass is one `jax.jit` program per (batch size, caption length), so a notebook that encodes batches of
the same size compiles once; `trim=True` encodes at `caption_bucket` of the longest prompt (a handful of lengths).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.t5 import T5Encoder
from pixart_jax.models.tokenizer import T5PromptTokenizer, load_tokenizer
from pixart_jax.parallel.sharding import Rules

MAX_LENGTH = 300  # PixArt-Sigma caption length
CAPTION_BUCKETS = (16, 32, 64, 128, 256)  # trimmed caption lengths (then max_length)


def caption_bucket(tokens: int, max_length: int = MAX_LENGTH) -> int:
  """The caption length for a batch whose longest caption has `tokens` tokens: the smallest of
  `CAPTION_BUCKETS` that holds it, else `max_length`. Few lengths, so few compiled programs.

  Dropping the pad positions past it changes no valid output: T5's attention and the DiT's cross-attention mask
  pad KEYS (a -1e30 logit, exactly 0 weight), so every position before the cut sees the same keys as at full length
  (the official `PixArtMS.forward` likewise drops pad tokens, `y.masked_select(mask)`).
  """
  if tokens < 1 or max_length < 1:
    raise ValueError(f"caption_bucket: tokens and max_length must be >= 1, got {tokens} and {max_length}")
  return min(next((n for n in CAPTION_BUCKETS if n >= tokens), max_length), max_length)


class TextEncoder:
  """A T5 tokenizer bundled with a `T5Encoder` (weights stay where they were placed).

  offload: keep the weights in host memory (numpy) instead: each encode brings them to the device as call
  arguments and frees them after, so T5-XXL's ~9 GiB (bf16) is not resident while the DiT samples - what lets 4K
  sampling fit one 16 GiB v5e chip (bench/results/tpu_verdicts.md), at the cost of one host-to-device copy of the
  weights per encode. Single-device encoders only (sharded weights stay where they are).
  """

  def __init__(self, tokenizer: T5PromptTokenizer, encoder: T5Encoder, *, offload: bool = False):
    vocab = encoder.config.vocab_size
    if tokenizer.vocab_size > vocab:
      raise ValueError(f"tokenizer emits {tokenizer.vocab_size} ids but the encoder embeds only "
                       f"{vocab} (config vocab_size)")
    self.tokenizer = tokenizer
    self.encoder = encoder
    self.offload = offload
    if offload:
      state = nnx.state(encoder)
      if any(isinstance(a, jax.Array) and len(a.sharding.device_set) > 1 for a in jax.tree.leaves(state)):
        raise ValueError("offload=True keeps a single-device T5 in host memory; this encoder is sharded over "
                         "several devices (load it without a mesh, or keep offload off)")
      nnx.update(encoder, jax.device_get(state))
    # NNX modules are pytrees: one compile per input shape (i.e. per batch size), cached per instance.
    self._jitted = jax.jit(lambda model, ids, mask: model(ids, mask))

  @classmethod
  def from_pretrained(cls, src: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                      mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
                      progress: bool = False, offload: bool = False) -> "TextEncoder":
    """src: a pipeline dir / Hub id with `text_encoder/` and `tokenizer/` (see `load_t5`); offload: see the class."""
    from pixart_jax.convert.t5_keys import load_t5  # convert depends on models, not vice versa
    if offload and mesh is not None and mesh.size > 1:
      raise ValueError(f"offload=True keeps a single-device T5 in host memory, but the mesh has {mesh.size} "
                       "devices: use one device (mesh=None; sample: --mesh data=1) or keep offload off")
    tokenizer = load_tokenizer(src)
    encoder = load_t5(src, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                      progress=progress)
    return cls(tokenizer, encoder, offload=offload)

  @property
  def hidden_size(self) -> int:
    return self.encoder.config.d_model

  def tokenize(self, prompts: Sequence[str], max_length: int = MAX_LENGTH):
    """-> (ids (B, max_length) int32, mask (B, max_length) int32) numpy arrays."""
    return self.tokenizer.tokenize(prompts, max_length=max_length)

  def encode_ids(self, input_ids, attention_mask) -> jax.Array:
    """(B S) ids and mask -> (B S D) float32 last_hidden_state (jitted; compiles once per shape)."""
    return self._jitted(self.encoder, jnp.asarray(input_ids, jnp.int32),
                        jnp.asarray(attention_mask, jnp.int32))

  def encode_prompts(self, prompts: Sequence[str], max_length: int = MAX_LENGTH, *,
                     trim: bool = False) -> tuple[jax.Array, jax.Array]:
    """prompts: B strings -> (embeds (B, S, D) float32, mask (B, S) int32), S = max_length.

    trim: S = `caption_bucket` of the longest prompt's token count instead: the same embeddings for the first S
    positions (to float rounding) at a fraction of the cost, and a shorter caption for the DiT's cross-attention.
    Embeddings are float32 whatever the compute dtype (the residual stream and the final RMSNorm
    run in float32); pad positions hold real encoder outputs, as in PyTorch. Prompts longer than
    `max_length` tokens are truncated with a logged WARNING.
    """
    ids, mask = self.tokenize(prompts, max_length)
    if trim:
      n = caption_bucket(int(mask.sum(axis=1).max()), max_length)
      ids, mask = ids[:, :n], mask[:, :n]
    mask = jnp.asarray(mask)
    return self.encode_ids(ids, mask), mask

  __call__ = encode_prompts


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str],
                   max_length: int = MAX_LENGTH) -> tuple[jax.Array, jax.Array]:
  """Convenience: `encoder.encode_prompts(prompts, max_length)`."""
  return encoder.encode_prompts(prompts, max_length)
