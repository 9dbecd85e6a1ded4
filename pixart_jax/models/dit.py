"""The PixArt-Sigma diffusion transformer (official `PixArtMS`, diffusers `PixArtTransformer2DModel`) in NNX.

Axis legend: B batch, H W latent height/width (NHWC), C latent channels, h w token grid (H/p, W/p),
L = h*w image tokens, S caption tokens, Dc caption width, D hidden width.

Blocks are grouped into stages of consecutive layers with the same KV-compression ratio; each stage holds
stacked parameters (leading `layers` axis) and runs under `jax.lax.scan` with a selectable remat policy.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.attention import CrossAttention, SelfAttention
from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.embeddings import (CaptionProjection, MicroConditionEmbedder, PatchEmbed, TimestepEmbedder,
                                          drop_captions, sincos_2d)
from pixart_jax.models.layers import Dtype, Mlp, dense, layer_norm, modulate
from pixart_jax.models.remat import RematPolicy
from pixart_jax.parallel.sharding import constrain, make_param

ACT = ("batch", "activation_length", "activation_embed")


def _table_init(dim: int):
  def init(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) / dim**0.5
  return init


class Block(nnx.Module):
  """adaLN-single block: modulated self-attn, plain cross-attn, modulated MLP (docs/ARCHITECTURE.md §2.7)."""

  def __init__(self, cfg: DiTConfig, *, kv_ratio: int, opts: AttentionOptions, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.eps = cfg.norm_eps
    self.scale_shift_table = make_param(_table_init(d), rngs.params(), (6, d), param_dtype, ("table", "embed"))
    self.attn = SelfAttention(d, cfg.num_heads, kv_ratio=kv_ratio, kv_mode=cfg.kv_compress_mode,
                              qk_norm=cfg.qk_norm, opts=opts, **kw)
    self.cross_attn = CrossAttention(d, cfg.num_heads, opts=opts, **kw)
    self.mlp = Mlp(d, cfg.mlp_hidden, **kw)

  def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array, t0: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """x (B L D), y (B S D), mask (B S) bool, t0 (B 6 D) -> (B L D)."""
    mod = self.scale_shift_table[...].astype(t0.dtype)[None] + t0
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [mod[:, i : i + 1] for i in range(6)]
    x = x + gate_msa * self.attn(modulate(layer_norm(x, self.eps), shift_msa, scale_msa), hw)
    x = x + self.cross_attn(x, y, mask)
    x = x + gate_mlp * self.mlp(modulate(layer_norm(x, self.eps), shift_mlp, scale_mlp))
    return constrain(x, ACT)


class FinalLayer(nnx.Module):
  """T2IFinalLayer: LayerNorm, modulation by the raw timestep embedding, Linear(D -> p*p*C_out), zero-init."""

  def __init__(self, cfg: DiTConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.eps = cfg.norm_eps
    self.scale_shift_table = make_param(_table_init(d), rngs.params(), (2, d), param_dtype, ("table", "embed"))
    self.linear = dense(d, p * p * cfg.out_channels, ("embed", None), zero=True, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t_emb: jax.Array) -> jax.Array:
    """x (B L D), t_emb (B D) -> (B L p*p*C_out)."""
    mod = self.scale_shift_table[...].astype(t_emb.dtype)[None] + t_emb[:, None]
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    return self.linear(modulate(layer_norm(x, self.eps), shift, scale))


def _make_stage(cfg: DiTConfig, count: int, kv_ratio: int, opts: AttentionOptions, dtype, param_dtype,
                rngs: nnx.Rngs) -> Block:
  """`count` Blocks with stacked parameters (leading axis named `layers`)."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r: nnx.Rngs) -> Block:
    return Block(cfg, kv_ratio=kv_ratio, opts=opts, dtype=dtype, param_dtype=param_dtype, rngs=r)

  return make(rngs)


class PixArtSigma(nnx.Module):
  """PixArt-Sigma DiT. `__call__(x, t, y, mask)`: NHWC latents in, (B, H, W, 2C) (eps, variance value) out.

  cfg: the architecture. How it runs: dtype (compute), param_dtype (storage), remat, scan, and `attention`
  (`AttentionOptions`, a backend name, or None for xla). `models.spec.ModelSpec` holds all of these.
  """

  def __init__(self, cfg: DiTConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str | RematPolicy = "none", scan: bool = True,
               attention: AttentionOptions | str | None = None, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    self.attention = AttentionOptions.parse(attention)
    self.remat = RematPolicy.parse(remat)
    self.scan = scan
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, d, **kw)
    self.t_embedder = TimestepEmbedder(d, **kw)
    self.micro = MicroConditionEmbedder(d, **kw) if cfg.micro_conditions else None
    self.t_block = dense(d, 6 * d, ("embed", "mlp"), kernel_init=nnx.initializers.normal(0.02), **kw)
    self.caption = CaptionProjection(cfg.caption_channels, d, **kw)
    self.stages = nnx.List([_make_stage(cfg, count, ratio, self.attention, dtype, param_dtype, rngs)
                            for _, count, ratio in cfg.stages()])
    self.final = FinalLayer(cfg, **kw)

  def pos_embed(self, h: int, w: int) -> jax.Array:
    """(1, h*w, D) sincos PE for an (h, w) token grid, recomputed per shape (static)."""
    pe = sincos_2d(self.cfg.hidden_size, h, w, self.cfg.base_size, self.cfg.interpolation_scale)
    return jnp.asarray(pe, dtype=self.dtype)[None]

  def _run_stage(self, stage: Block, x, y, mask, t0, hw, start: int = 0, stop: int | None = None):
    """Layers [start, stop) of a stacked stage (all by default) over x (B L D)."""
    graphdef, state = nnx.split(stage)
    n = jax.tree.leaves(state)[0].shape[0]
    stop = n if stop is None else stop
    if stop <= start:
      return x
    if (start, stop) != (0, n):
      state = jax.tree.map(lambda a: a[start:stop], state)

    def body(carry, layer_state):
      return nnx.merge(graphdef, layer_state)(carry, y, mask, t0, hw), None

    body = self.remat.wrap(body)
    if self.scan:
      x, _ = jax.lax.scan(body, x, state)
      return x
    for i in range(stop - start):
      x, _ = body(x, jax.tree.map(lambda a: a[i], state))
    return x

  def run_blocks(self, x, y, mask, t0, hw, start: int, stop: int):
    """Blocks [start, stop) of the whole stack (across stages) over x (B L D); y (B S D) projected captions,
    mask (B S) bool, t0 (B 6 D) (see `embed`)."""
    for stage, (first, count, _) in zip(self.stages, self.cfg.stages()):
      lo, hi = max(start, first), min(stop, first + count)
      if lo < hi:
        x = self._run_stage(stage, x, y, mask, t0, hw, lo - first, hi - first)
    return x

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array, *,
               resolution: jax.Array | None = None, aspect_ratio: jax.Array | None = None,
               caption_drop: jax.Array | None = None, null_caption: jax.Array | None = None) -> jax.Array:
    """Denoiser forward.

    x (B H W C) noisy latents; t (B,) float timesteps (fractional allowed); y (B S Dc) caption features;
    mask (B S) caption mask (1 = token); resolution (B 2) / aspect_ratio (B 1) only with micro-conditions;
    caption_drop (B,) bool + null_caption (S Dc): classifier-free-guidance dropout (training).
    Returns (B H W 2C) float32: channels [:C] = eps, [C:] = variance interpolation value.
    """
    tokens, t_emb, t0, y, mask, hw = self.embed(x, t, y, mask, resolution=resolution, aspect_ratio=aspect_ratio,
                                                caption_drop=caption_drop, null_caption=null_caption)
    tokens = self.run_blocks(tokens, y, mask, t0, hw, 0, self.cfg.depth)
    return self.head(tokens, t_emb, hw)

  def embed(self, x: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array, *,
            resolution: jax.Array | None = None, aspect_ratio: jax.Array | None = None,
            caption_drop: jax.Array | None = None, null_caption: jax.Array | None = None):
    """The inputs of the blocks (arguments as `__call__`): (tokens (B L D), t_emb (B D), t0 (B 6 D),
    projected captions (B S D), mask (B S) bool, (h, w) token grid)."""
    cfg = self.cfg
    b, hh, ww, c = x.shape
    p = cfg.patch_size
    if hh % p or ww % p:
      raise ValueError(f"latent {hh}x{ww} is not divisible by the patch size {p}")
    if c != cfg.in_channels:
      raise ValueError(f"latent has {c} channels, the model expects {cfg.in_channels}")
    h, w = hh // p, ww // p
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    mask = mask.astype(bool)

    tokens = self.patch_embed(x) + self.pos_embed(h, w)
    tokens = constrain(tokens, ACT)
    t_emb = self.t_embedder(t)
    if self.micro is not None:
      if resolution is None or aspect_ratio is None:
        raise ValueError("this model uses micro-conditions: pass resolution (B, 2) and aspect_ratio (B, 1)")
      t_emb = t_emb + self.micro(resolution, aspect_ratio).astype(t_emb.dtype)
    t0 = einops.rearrange(self.t_block(jax.nn.silu(t_emb)), "b (six d) -> b six d", six=6)

    if caption_drop is not None:
      if null_caption is None:
        raise ValueError("caption_drop needs null_caption (S, Dc)")
      y = drop_captions(y, null_caption, caption_drop)
    y = constrain(self.caption(y.astype(self.dtype)), ("batch", "caption", "activation_embed"))

    return tokens, t_emb, t0, y, mask, (h, w)

  def head(self, tokens: jax.Array, t_emb: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Final layer + unpatchify: tokens (B L D), t_emb (B D) -> (B H W 2C) float32."""
    h, w = hw
    p = self.cfg.patch_size
    out = constrain(self.final(tokens, t_emb), ACT)
    out = einops.rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p)
    return out.astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves); works on abstract models."""
  return sum(int(jnp.size(v)) if not hasattr(v, "shape") else int(jnp.prod(jnp.array(v.shape)))
             for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
