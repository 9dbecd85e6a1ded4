"""ControlNet-Transformer for PixArt-Sigma: the "ControlNet-Half" design PixArt-alpha published (official
`diffusion/model/nets/pixart_controlnet.py`: `ControlT2IDitBlockHalf`, `ControlPixArtHalf` / `ControlPixArtMSHalf`;
PixArt-delta paper, section 3), as an NNX module wrapping a loaded PixArt-Sigma.

Axis legend: B batch, H W latent height/width (NHWC), C latent channels, L = h*w tokens, S caption tokens,
D hidden width, N copied blocks.

The control branch holds trainable copies of the first N base blocks. The control latent (the VAE latent of the
control image, same shape as x) is embedded by the BASE patch embedding plus the sincos PE; then

    x = base.blocks[0](x)
    c = before_proj(c)                                    zero-initialised Linear(D, D), block 0 only
    for i in 1..N:
      c = copy[i-1](x + c if i == 1 else c)               copies of base blocks 0..N-1 (same y, t0, mask)
      x = base.blocks[i](x + scale * after_proj[i-1](c))  zero-initialised Linear(D, D) per copy
    x = base.blocks[N+1:](x); out = base.final(x)

so at initialisation (zero projections) the model is exactly the base. `scale` (control_scale) is 1 in the
official code; it is a traced argument here (0 turns the control off without recompiling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.dit import ACT, Block, PixArtSigma
from pixart_jax.models.layers import Dtype, dense
from pixart_jax.parallel.sharding import constrain


class ControlBranch(nnx.Module):
  """The trainable part: `blocks` (N copies of base blocks 0..N-1, unstacked), `before_proj` (D -> D, zero) and
  `after_proj` (N x (D -> D), zero). Official keys: controlnet.{i}.copied_block / before_proj / after_proj."""

  def __init__(self, base: PixArtSigma, num_blocks: int, *, dtype: Dtype | None = None,
               param_dtype: Dtype | None = None, rngs: nnx.Rngs):
    cfg = base.cfg
    if not 1 <= num_blocks < cfg.depth:
      raise ValueError(f"control blocks must lie in [1, {cfg.depth - 1}] for a {cfg.depth}-block model, "
                       f"got {num_blocks}")
    dtype = base.dtype if dtype is None else dtype
    param_dtype = jax.tree.leaves(nnx.state(base, nnx.Param))[0].dtype if param_dtype is None else param_dtype
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_blocks = num_blocks
    self.blocks = nnx.List([Block(cfg, kv_ratio=cfg.kv_ratio(i), opts=base.attention, **kw)
                            for i in range(num_blocks)])
    self.before_proj = dense(d, d, ("embed", "mlp"), zero=True, **kw)
    self.after_proj = nnx.List([dense(d, d, ("mlp", "embed"), zero=True, **kw) for _ in range(num_blocks)])


def copy_base_blocks(branch: ControlBranch, base: PixArtSigma) -> None:
  """Sets the branch's blocks to copies of base blocks 0..N-1 (the official initialisation: `deepcopy`)."""
  for i, block in enumerate(branch.blocks):
    for stage, (first, count, _) in zip(base.stages, base.cfg.stages()):
      if first <= i < first + count:
        layer = jax.tree.map(lambda a: a[i - first], nnx.state(stage, nnx.Param))
        nnx.update(block, jax.tree.map(jnp.copy, layer))


class ControlPixArtSigma(nnx.Module):
  """PixArt-Sigma + a control branch. `__call__(x, t, y, mask, *, control=None, control_scale=1.0, ...)`: the
  base forward when `control` is None, else the ControlNet-Half forward (module docstring)."""

  def __init__(self, base: PixArtSigma, controlnet: ControlBranch):
    if controlnet.num_blocks >= base.cfg.depth:
      raise ValueError(f"the control branch has {controlnet.num_blocks} blocks, the base only {base.cfg.depth}")
    self.base_model, self.controlnet = base, controlnet

  @property
  def cfg(self):
    return self.base_model.cfg

  @property
  def dtype(self):
    return self.base_model.dtype

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array, *, control: jax.Array | None = None,
               control_scale: jax.Array | float = 1.0, **kw) -> jax.Array:
    """x (B H W C), t (B,), y (B S Dc), mask (B S); control (B H W C) control latent or None; control_scale ()
    multiplies the branch's outputs; kw: the base's (resolution, aspect_ratio, caption_drop, null_caption).
    Returns (B H W 2C) float32."""
    base, branch = self.base_model, self.controlnet
    if control is None:
      return base(x, t, y, mask, **kw)
    if control.shape != x.shape:
      raise ValueError(f"control latent has shape {control.shape}, the latents {x.shape}: they must match")
    tokens, t_emb, t0, y, mask, hw = base.embed(x, t, y, mask, **kw)
    c = base.patch_embed(control) + base.pos_embed(*hw)
    scale = jnp.asarray(control_scale, tokens.dtype)
    tokens = base.run_blocks(tokens, y, mask, t0, hw, 0, 1)
    c = branch.before_proj(c)
    for i, (block, proj) in enumerate(zip(branch.blocks, branch.after_proj)):
      c = constrain(block(tokens + c if i == 0 else c, y, mask, t0, hw), ACT)
      tokens = base.run_blocks(tokens + scale * proj(c), y, mask, t0, hw, i + 1, i + 2)
    tokens = base.run_blocks(tokens, y, mask, t0, hw, branch.num_blocks + 1, base.cfg.depth)
    return base.head(tokens, t_emb, hw)


def with_control(base: PixArtSigma, num_blocks: int, *, seed: int = 0) -> ControlPixArtSigma:
  """A fresh control branch on `base` (copies of its first `num_blocks` blocks, zero projections)."""
  branch = ControlBranch(base, num_blocks, rngs=nnx.Rngs(seed))
  copy_base_blocks(branch, base)
  return ControlPixArtSigma(base, branch)
