"""CLIP image and text towers with their projections (transformers' `CLIPModel` layout) in Flax NNX.

Port of transformers' models/clip/modeling_clip.py (`CLIPModel.get_image_features` / `get_text_features`), any
size from its config.json (ViT-B/32 ... ViT-L/14, ViT-L/14-336).

Axis legend: B batch, S text tokens, L image tokens (1 class + (H/p)(W/p) patches), D width, N heads, K head dim,
E projection dim, F MLP width, p patch size.

  vision: x = [class_embedding; conv_p(pixels)] + position_embedding           B L D
          x = pre_layrnorm(x); layers; pooled = post_layernorm(x[:, 0])        B D
          image_embeds = pooled @ visual_projection                            B E
  text:   x = token_embedding[ids] + position_embedding[:S]                    B S D
          layers with a causal mask (and the padding mask when given); x = final_layer_norm(x)
          pooled = x[b, eos_position(ids[b])]                                  B D
          text_embeds = pooled @ text_projection                               B E
  layer:  x += out_proj(attn(layer_norm1(x)));  x += fc2(act(fc1(layer_norm2(x))))   (pre-LN)

EOS pooling follows current transformers (`CLIPTextModel.forward`): when the config's `eos_token_id` is 2 (the
value older configs carried before transformers PR #24773) the position is the argmax of the token ids (the
EOS token has the largest id in CLIP's vocabulary); otherwise it is the first position holding eos_token_id
(0 when a row has none, as in transformers). The logit scale is not needed for scores and is not kept.

Precision: LayerNorm statistics, attention logits/softmax and the residual stream are float32; matmuls run in
`dtype` at `precision` (HIGHEST by default, so TPU runs fp32 matmuls in full precision).

Parameters mirror transformers' module names (`text_model/encoder/layers/self_attn/q_proj/kernel`, ...); the
encoder layers are stacked on a leading `layers` axis and run under `jax.lax.scan`. Logical axes as in the rest
of the package (embed, heads, mlp, vocab, norm, layers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.layers import layer_norm
from pixart_jax.parallel.sharding import constrain, param_init

__all__ = ["CLIPTowerConfig", "CLIPConfig", "CLIPModel", "ACTIVATIONS"]

# transformers ACT2FN names used by CLIP-family configs
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
_LEGACY_EOS = 2

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (configuration_clip.py), for fields a config.json omits
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
  """One tower. Text-only fields: vocab_size, max_position_embeddings, eos_token_id; vision-only: image_size,
  patch_size, num_channels."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  vocab_size: int = 0
  max_position_embeddings: int = 0
  eos_token_id: int = 0
  image_size: int = 0
  patch_size: int = 0
  num_channels: int = 3

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                       f"{self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_positions(self) -> int:
    """Vision: 1 + number of patches; text: max_position_embeddings."""
    return 1 + (self.image_size // self.patch_size) ** 2 if self.image_size else self.max_position_embeddings


def _tower(raw: Mapping[str, Any], defaults: dict, which: str, legacy: Mapping[str, Any] | None) -> CLIPTowerConfig:
  merged = {**defaults, **{k: v for k, v in (raw or {}).items() if k in defaults}}
  merged.update({k: v for k, v in (legacy or {}).items() if k in defaults})  # `*_config_dict` wins, as in transformers
  for key in ("image_size", "patch_size"):
    if key in merged and not isinstance(merged[key], int):
      raise ValueError(f"{which}_config.{key}={merged[key]!r}: only square sizes (an int) are supported")
  if "eos_token_id" in merged and not isinstance(merged["eos_token_id"], int):
    raise ValueError(f"{which}_config.eos_token_id={merged['eos_token_id']!r}: a single int is supported")
  merged["layer_norm_eps"] = float(merged["layer_norm_eps"])
  return CLIPTowerConfig(**merged)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTowerConfig
  vision: CLIPTowerConfig
  projection_dim: int = 512

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any]) -> "CLIPConfig":
    """From a transformers CLIPModel config.json (as a dict); fields it omits take transformers' defaults,
    `text_config_dict` / `vision_config_dict` (older files) override `text_config` / `vision_config`."""
    model_type = cfg.get("model_type", "clip")
    if model_type != "clip":
      raise ValueError(f"config.json field model_type={model_type!r} is not supported (only 'clip')")
    return cls(text=_tower(cfg.get("text_config"), _TEXT_DEFAULTS, "text", cfg.get("text_config_dict")),
               vision=_tower(cfg.get("vision_config"), _VISION_DEFAULTS, "vision", cfg.get("vision_config_dict")),
               projection_dim=int(cfg.get("projection_dim") or 512))


def _linear(n_in: int, n_out: int, names, *, bias: bool = True, dtype, param_dtype, precision, rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
                    kernel_init=param_init(nnx.initializers.normal(n_in ** -0.5), names),
                    bias_init=param_init(nnx.initializers.zeros_init(), (names[1],)), rngs=rngs)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis; statistics in float32; returns float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(param_init(nnx.initializers.ones_init(), ("norm",))(None, (dim,), param_dtype))
    self.bias = nnx.Param(param_init(nnx.initializers.zeros_init(), ("norm",))(None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x.astype(jnp.float32), self.eps, self.scale[...], self.bias[...])


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with biases; logits scaled by K^-0.5; additive float32 mask."""

  def __init__(self, cfg: CLIPTowerConfig, **kw):
    d = cfg.hidden_size
    self.num_heads, self.dtype, self.precision = cfg.num_attention_heads, kw["dtype"], kw["precision"]
    self.q_proj = _linear(d, d, ("embed", "heads"), **kw)
    self.k_proj = _linear(d, d, ("embed", "heads"), **kw)
    self.v_proj = _linear(d, d, ("embed", "heads"), **kw)
    self.out_proj = _linear(d, d, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x: B L D (normalized); bias: (B|1, 1, L, L) float32 or None -> B L D."""
    x = x.astype(self.dtype)
    split = lambda y: einops.rearrange(y, "b l (n k) -> b l n k", n=self.num_heads)  # noqa: E731
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqnk,bsnk->bnqs", q, k, precision=self.precision, preferred_element_type=jnp.float32)
    logits = logits * scale
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bnqs,bsnk->bqnk", probs, v, precision=self.precision)
    return self.out_proj(einops.rearrange(out, "b q n k -> b q (n k)"))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    self.act = ACTIVATIONS[cfg.hidden_act]
    self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B L D -> B L D; the activation runs in float32."""
    h = self.fc1(x.astype(self.fc1.dtype)).astype(jnp.float32)
    return self.fc2(self.act(h).astype(self.fc2.dtype))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig, **kw):
    eps, pd = cfg.layer_norm_eps, kw["param_dtype"]
    self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=eps, param_dtype=pd)
    self.self_attn = CLIPAttention(cfg, **kw)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=eps, param_dtype=pd)
    self.mlp = CLIPMLP(cfg, **kw)

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x: B L D float32 residual stream -> B L D float32."""
    x = x + self.self_attn(self.layer_norm1(x), bias).astype(jnp.float32)
    x = x + self.mlp(self.layer_norm2(x)).astype(jnp.float32)
    return constrain(x, ("batch", None, None))


class CLIPEncoder(nnx.Module):
  """`num_hidden_layers` CLIPEncoderLayers stacked on a leading `layers` axis, run with jax.lax.scan."""

  def __init__(self, cfg: CLIPTowerConfig, *, rngs: nnx.Rngs, **kw):
    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> CLIPEncoderLayer:
      return CLIPEncoderLayer(cfg, rngs=r, **kw)

    self.layers = make(rngs)

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    graphdef, params = nnx.split(self.layers)

    def body(h, layer_params):
      return nnx.merge(graphdef, layer_params)(h, bias), None

    return jax.lax.scan(body, x, params)[0]


class Embedding(nnx.Module):
  """A (rows, D) table (`nn.Embedding.weight` layout)."""

  def __init__(self, rows: int, dim: int, names, *, param_dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(param_init(nnx.initializers.normal(0.02), names)(rngs.params(), (rows, dim),
                                                                                 param_dtype))


class CLIPTextTransformer(nnx.Module):
  """transformers CLIPTextTransformer (`CLIPTextModel.text_model`): pooled EOS state B D."""

  def __init__(self, cfg: CLIPTowerConfig, *, rngs: nnx.Rngs, **kw):
    self.cfg = cfg
    pd = kw["param_dtype"]
    self.embeddings = nnx.Dict(
        token_embedding=Embedding(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), param_dtype=pd, rngs=rngs),
        position_embedding=Embedding(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), param_dtype=pd,
                                     rngs=rngs))
    self.encoder = CLIPEncoder(cfg, rngs=rngs, **kw)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pd)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids: B S int (S <= max_position_embeddings); attention_mask: B S (1 = token) or None -> B D f32."""
    b, s = input_ids.shape
    if s > self.cfg.max_position_embeddings:
      raise ValueError(f"input_ids have {s} tokens, more than max_position_embeddings="
                       f"{self.cfg.max_position_embeddings}")
    tok = jnp.take(self.embeddings["token_embedding"].embedding[...], input_ids, axis=0)
    x = tok + self.embeddings["position_embedding"].embedding[:s]
    x = constrain(x.astype(jnp.float32), ("batch", None, None))
    allowed = jnp.tril(jnp.ones((s, s), bool))[None, None]                       # 1 1 S S (query, key)
    if attention_mask is not None:
      allowed = allowed & (attention_mask[:, None, None, :] > 0)                 # B 1 S S
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    x = self.final_layer_norm(self.encoder(x, bias))
    ids = input_ids.astype(jnp.int32)
    eos = self.cfg.eos_token_id
    at = jnp.argmax(ids, axis=-1) if eos == _LEGACY_EOS else jnp.argmax(ids == eos, axis=-1)   # B
    return x[jnp.arange(b), at]


class CLIPVisionTransformer(nnx.Module):
  """transformers CLIPVisionTransformer (`CLIPVisionModel.vision_model`): pooled class state B D."""

  def __init__(self, cfg: CLIPTowerConfig, *, rngs: nnx.Rngs, **kw):
    self.cfg = cfg
    d, p, pd = cfg.hidden_size, cfg.patch_size, kw["param_dtype"]
    self.embeddings = nnx.Dict(
        class_embedding=nnx.Param(param_init(nnx.initializers.normal(d ** -0.5), ("embed",))(rngs.params(), (d,),
                                                                                             pd)),
        patch_embedding=nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                 dtype=kw["dtype"], param_dtype=pd, precision=kw["precision"],
                                 kernel_init=param_init(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
                                 rngs=rngs),
        position_embedding=Embedding(cfg.num_positions, d, (None, "embed"), param_dtype=pd, rngs=rngs))
    self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd)  # sic: transformers' name
    self.encoder = CLIPEncoder(cfg, rngs=rngs, **kw)
    self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: B H W C, normalized, H = W = image_size -> B D float32."""
    size, c = self.cfg.image_size, self.cfg.num_channels
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (size, size, c):
      raise ValueError(f"pixel_values must be (B, {size}, {size}, {c}) NHWC, got shape {pixel_values.shape}")
    emb = self.embeddings
    patches = emb["patch_embedding"](pixel_values.astype(emb["patch_embedding"].dtype))   # B h w D
    patches = einops.rearrange(patches, "b h w d -> b (h w) d").astype(jnp.float32)
    cls = jnp.broadcast_to(emb["class_embedding"][...].astype(jnp.float32), (patches.shape[0], 1, patches.shape[2]))
    x = jnp.concatenate([cls, patches], axis=1) + emb["position_embedding"].embedding[...].astype(jnp.float32)
    x = self.pre_layrnorm(constrain(x, ("batch", None, None)))
    x = self.encoder(x, None)
    return self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
  """CLIP's two towers and projections: `image_features(pixels)` B E, `text_features(ids, mask)` B E (float32).

  Args:
    config: architecture (`CLIPConfig.from_hf_config(json)`).
    dtype: compute dtype of the matmuls; param_dtype: storage dtype.
    precision: matmul/conv precision (jax.lax.Precision, or None for the backend default).
  """

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
    self.text_model = CLIPTextTransformer(config.text, rngs=rngs, **kw)
    self.vision_model = CLIPVisionTransformer(config.vision, rngs=rngs, **kw)
    e = config.projection_dim
    self.text_projection = _linear(config.text.hidden_size, e, ("embed", None), bias=False, rngs=rngs, **kw)
    self.visual_projection = _linear(config.vision.hidden_size, e, ("embed", None), bias=False, rngs=rngs, **kw)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: B H W C (CLIP-normalized, see `clip_preprocess`) -> image_embeds B E float32 (unnormalized)."""
    pooled = self.vision_model(pixel_values)
    return constrain(self.visual_projection(pooled.astype(self.visual_projection.dtype)).astype(jnp.float32),
                     ("batch", None))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids: B S int; attention_mask: B S or None -> text_embeds B E float32 (unnormalized)."""
    pooled = self.text_model(input_ids, attention_mask)
    return constrain(self.text_projection(pooled.astype(self.text_projection.dtype)).astype(jnp.float32),
                     ("batch", None))
