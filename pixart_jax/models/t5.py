"""T5 (v1.1) text encoder in Flax NNX: config, blocks and the scanned encoder stack.

Computation (identical to transformers' `T5EncoderModel`, eval mode):
  x = embed[ids]                                                    B S D
  bias = rel_bias[bucket(k - q)]  (block 0's table, shared by all)  H S S
  24x: x += o(attn(rms(x)) with logits q.k (no 1/sqrt(d_kv)) + bias + mask)
       x += wo(act(wi_0(rms(x))) * wi_1(rms(x)))    (gated; `wo(act(wi(.)))` when not gated)
  out = rms_final(x)                                                B S D

Precision: parameters are stored in `param_dtype`, matmuls run in `dtype`; the residual stream,
RMSNorm statistics, the position bias, the attention logits/softmax and the accumulation of every
projection back into the residual (`o`, `wo`; `preferred_element_type=float32`) stay in float32.
That sidesteps the fp16 `wo` overflow pitfall (docs/ARCHITECTURE.md §8.1). The output is always float32.

Parameters (logical axis names; the block stack has a leading `layers` axis):
  embed/embedding        (V, D)          (vocab, embed)
  rel_bias/embedding     (NB, H)         (None, heads)
  blocks/attn_norm/scale (L, D)          (layers, norm)
  blocks/attn/{q,k,v}/kernel (L, D, H*K) (layers, embed, heads)   heads fused, head-major
  blocks/attn/o/kernel   (L, H*K, D)     (layers, heads, embed)
  blocks/ffn_norm/scale  (L, D)          (layers, norm)
  blocks/ffn/{wi_0,wi_1|wi}/kernel (L, D, F) (layers, embed, mlp)
  blocks/ffn/wo/kernel   (L, F, D)       (layers, mlp, embed)
  final_norm/scale       (D,)            (norm,)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.remat import RematPolicy
from pixart_jax.parallel import sharding

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers ACT2FN["gelu"] (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (T5 v1.1)
    "silu": jax.nn.silu,
}
# transformers `feed_forward_proj` -> (dense_act_fn, is_gated_act), as in `T5Config.__post_init__`.
_FEED_FORWARD_PROJ = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "silu": ("silu", False),
    "gated-relu": ("relu", True),
    "gated-gelu": ("gelu_new", True),
    "gated-silu": ("silu", True),
}
_REQUIRED_HF_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 encoder (fields named as in transformers' `T5Config`)."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  is_gated_act: bool = True

  def __post_init__(self):
    if self.dense_act_fn not in _ACTIVATIONS:
      raise ValueError(f"T5Config.dense_act_fn={self.dense_act_fn!r} is not supported; "
                       f"choose one of {sorted(_ACTIVATIONS)}")
    for name in _REQUIRED_HF_FIELDS + ("relative_attention_num_buckets",
                                       "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def v1_1_xxl(cls) -> "T5Config":
    """google/t5-v1_1-xxl encoder (PixArt-Sigma's text encoder, docs/ARCHITECTURE.md §8.1)."""
    return cls()

  @classmethod
  def tiny(cls, **overrides) -> "T5Config":
    """A few-thousand-parameter T5 v1.1-style encoder for tests and the CPU demo."""
    base = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20)
    base.update(overrides)
    return cls(**base)

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any]) -> "T5Config":
    """Reads a transformers T5 `config.json` (as a dict); raises ValueError naming a bad field."""
    model_type = cfg.get("model_type", "t5")
    if model_type != "t5":
      raise ValueError(f"config.json field model_type={model_type!r} is not supported "
                       "(only 't5'; e.g. 'umt5' has per-layer position biases)")
    if cfg.get("is_decoder", False):
      raise ValueError("config.json field is_decoder=True is not supported (encoder only)")
    missing = [k for k in _REQUIRED_HF_FIELDS if k not in cfg]
    if missing:
      raise ValueError(f"config.json is missing required field(s) {missing}")
    proj = cfg.get("feed_forward_proj", "relu")
    if proj not in _FEED_FORWARD_PROJ:
      raise ValueError(f"config.json field feed_forward_proj={proj!r} is not supported; "
                       f"supported: {sorted(_FEED_FORWARD_PROJ)}")
    act, gated = _FEED_FORWARD_PROJ[proj]
    return cls(
        vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"], d_ff=cfg["d_ff"],
        num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
        dense_act_fn=act, is_gated_act=gated)


def relative_position_bucket(relative_position: jax.Array, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """Bidirectional T5 bucket of `relative_position` (= key_pos - query_pos), int32 in [0, num_buckets)."""
  num_buckets //= 2
  buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
  n = jnp.abs(relative_position)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  safe = jnp.maximum(n, 1).astype(jnp.float32)  # log(0) is never selected; avoid the -inf
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RMSNorm(nnx.Module):
  """T5 LayerNorm: x / sqrt(mean(x^2) + eps) * scale, statistics in float32; no mean, no bias."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(sharding.param_init(nnx.initializers.ones, ("norm",))(
        jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (... D) -> (... D) float32."""
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)


class _Kernel(nnx.Module):
  """A bias-free projection weight; contraction is done by the caller with einsum."""

  def __init__(self, shape: tuple[int, ...], names: tuple[str, ...], fan_in: int, *, param_dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=fan_in ** -0.5)
    self.kernel = nnx.Param(sharding.param_init(init, names)(rngs.params(), shape, param_dtype))


class T5Attention(nnx.Module):
  """Multi-head self-attention with an external additive bias; no 1/sqrt(d_kv) scaling."""

  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.num_heads = cfg.num_heads
    d, inner = cfg.d_model, cfg.inner_dim
    qkv = dict(shape=(d, inner), names=("embed", "heads"), fan_in=d, param_dtype=param_dtype, rngs=rngs)
    self.q, self.k, self.v = _Kernel(**qkv), _Kernel(**qkv), _Kernel(**qkv)
    self.o = _Kernel((inner, d), ("heads", "embed"), inner, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x: (B S D) normalized input; bias: (B|1, H, S, S) float32 (position bias + mask).

    Returns (B S D) float32.
    """
    dt = self.dtype
    x = x.astype(dt)

    def heads(w):  # B S D -> B S H K
      y = jnp.einsum("bsd,de->bse", x, w.kernel[...].astype(dt), preferred_element_type=jnp.float32).astype(dt)
      return einops.rearrange(y, "b s (h k) -> b s h k", h=self.num_heads)

    q, k, v = heads(self.q), heads(self.k), heads(self.v)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), v, preferred_element_type=jnp.float32).astype(dt)
    out = einops.rearrange(out, "b q h k -> b q (h k)")
    return jnp.einsum("bqe,ed->bqd", out, self.o.kernel[...].astype(dt),
                      preferred_element_type=jnp.float32)


class T5FeedForward(nnx.Module):
  """`wo(act(wi_0 x) * wi_1 x)` (gated) or `wo(act(wi x))`; activation in float32."""

  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.act = _ACTIVATIONS[cfg.dense_act_fn]
    self.gated = cfg.is_gated_act
    d, f = cfg.d_model, cfg.d_ff
    wi = dict(shape=(d, f), names=("embed", "mlp"), fan_in=d, param_dtype=param_dtype, rngs=rngs)
    if self.gated:
      self.wi_0, self.wi_1 = _Kernel(**wi), _Kernel(**wi)
    else:
      self.wi = _Kernel(**wi)
    self.wo = _Kernel((f, d), ("mlp", "embed"), f, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B S D) normalized input -> (B S D) float32."""
    dt = self.dtype
    x = x.astype(dt)

    def proj(w):
      return jnp.einsum("bsd,df->bsf", x, w.kernel[...].astype(dt),
                        preferred_element_type=jnp.float32)

    if self.gated:
      hidden = self.act(proj(self.wi_0)) * proj(self.wi_1)
    else:
      hidden = self.act(proj(self.wi))
    return jnp.einsum("bsf,fd->bsd", hidden.astype(dt), self.wo.kernel[...].astype(dt),
                      preferred_element_type=jnp.float32)


class T5Block(nnx.Module):
  """Pre-norm self-attention + pre-norm feed-forward, both residual (float32 residual)."""

  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, **kw)
    self.attn = T5Attention(cfg, dtype=dtype, **kw)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, **kw)
    self.ffn = T5FeedForward(cfg, dtype=dtype, **kw)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x: (B S D) float32; bias: (B|1, H, S, S) float32 -> (B S D) float32."""
    x = x + self.attn(self.attn_norm(x), bias)
    x = x + self.ffn(self.ffn_norm(x))
    return sharding.constrain(x, ("batch", "caption", None))


class T5Encoder(nnx.Module):
  """The T5 encoder stack (`T5EncoderModel.last_hidden_state`), blocks under `jax.lax.scan`.

  Args:
    config: architecture.
    dtype: compute dtype of the matmuls (float32 or bfloat16).
    param_dtype: storage dtype of the parameters.
    remat: remat policy of the scanned block (`pixart_jax.models.remat.RematPolicy` name:
      none / full / dots / dots_no_batch); only matters when differentiating through the encoder.
  """

  def __init__(self, config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str | RematPolicy = "none", rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.remat = RematPolicy.parse(remat)
    self.embed = nnx.Embed(
        config.vocab_size, config.d_model, dtype=param_dtype, param_dtype=param_dtype,
        embedding_init=sharding.param_init(nnx.initializers.normal(1.0), ("vocab", "embed")),
        rngs=rngs)
    self.rel_bias = nnx.Embed(
        config.relative_attention_num_buckets, config.num_heads, dtype=jnp.float32,
        param_dtype=param_dtype,
        embedding_init=sharding.param_init(nnx.initializers.normal(config.d_model ** -0.5),
                                           (None, "heads")),
        rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> T5Block:
      return T5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=r)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                              param_dtype=param_dtype, rngs=rngs)

  def position_bias(self, length: int) -> jax.Array:
    """(H, S, S) float32 bidirectional relative position bias for a length-S sequence."""
    pos = jnp.arange(length, dtype=jnp.int32)
    rel = pos[None, :] - pos[:, None]  # key - query
    buckets = relative_position_bucket(rel, self.config.relative_attention_num_buckets,
                                       self.config.relative_attention_max_distance)
    table = self.rel_bias.embedding[...].astype(jnp.float32)  # NB H
    return jnp.moveaxis(table[buckets], -1, 0)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids: (B S) int; attention_mask: (B S), 1 = valid token (None: all valid).

    Returns last_hidden_state (B S D) float32; pad positions are computed too (as in PyTorch).
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (B, S), got shape {input_ids.shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}")
    x = jnp.take(self.embed.embedding[...], input_ids, axis=0).astype(jnp.float32)
    x = sharding.constrain(x, ("batch", "caption", None))
    bias = self.position_bias(input_ids.shape[1])[None]  # 1 H S S
    if attention_mask is not None:
      neg = jnp.finfo(jnp.float32).min
      bias = bias + jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg)

    graphdef, params = nnx.split(self.blocks)

    def body(h, layer_params):
      return nnx.merge(graphdef, layer_params)(h, bias), None

    x, _ = jax.lax.scan(self.remat.wrap(body), x, params)
    return self.final_norm(x)
