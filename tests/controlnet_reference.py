"""PyTorch reference of the official PixArt ControlNet-Half forward, written from its published source (official
PixArt-alpha `diffusion/model/nets/pixart_controlnet.py`: `ControlT2IDitBlockHalf`, `ControlPixArtHalf.forward`),
on a tiny diffusers PixArt transformer as the base (its blocks are the official PixArtMSBlock numerically;
tests/test_dit_parity.py), fp32, random weights everywhere (the zero-initialised projections too)."""
from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch
from torch import nn


class ControlT2IDitBlockHalf(nn.Module):
  """As the official class: a copy of a base block, before_proj (block 0 only) and after_proj."""

  def __init__(self, base_block: nn.Module, block_index: int, hidden_size: int):
    super().__init__()
    self.copied_block = deepcopy(base_block)
    self.block_index = block_index
    if block_index == 0:
      self.before_proj = nn.Linear(hidden_size, hidden_size)
      nn.init.zeros_(self.before_proj.weight)
      nn.init.zeros_(self.before_proj.bias)
    self.after_proj = nn.Linear(hidden_size, hidden_size)
    nn.init.zeros_(self.after_proj.weight)
    nn.init.zeros_(self.after_proj.bias)

  def forward(self, x, c, **block_kw):
    if self.block_index == 0:
      c = self.before_proj(c)
      c = self.copied_block(x + c, **block_kw)
    else:
      c = self.copied_block(c, **block_kw)
    return c, self.after_proj(c)


def make_controlnet(ref, copy_blocks_num: int, *, seed: int = 7) -> nn.ModuleList:
  """The official `controlnet` ModuleList over `ref`'s blocks, then every weight perturbed (non-zero)."""
  d = ref.config.num_attention_heads * ref.config.attention_head_dim
  ctrl = nn.ModuleList([ControlT2IDitBlockHalf(ref.transformer_blocks[i], i, d) for i in range(copy_blocks_num)])
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in ctrl.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * (0.3 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.05))
  return ctrl.eval()


def control_forward(ref, ctrl: nn.ModuleList, x_nhwc, t, y, mask, c_nhwc, resolution=None,
                    aspect_ratio=None) -> np.ndarray:
  """`ControlPixArtHalf.forward(x, t, y, mask, c=c)` (its loop over base blocks and control blocks); with
  resolution / aspect_ratio the micro-conditioned `ControlPixArtMSHalf.forward`. NHWC in/out."""
  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))
  x, c = to_nchw(x_nhwc), to_nchw(c_nhwc)
  b, _, hh, ww = x.shape
  p = ref.config.patch_size
  h, w = hh // p, ww // p
  with torch.no_grad():
    c = ref.pos_embed(c)  # forward_c: x_embedder(c) + pos_embed
    x = ref.pos_embed(x)
    added = {"resolution": None, "aspect_ratio": None}
    if resolution is not None:
      added = {"resolution": torch.from_numpy(np.asarray(resolution, np.float32)),
               "aspect_ratio": torch.from_numpy(np.asarray(aspect_ratio, np.float32))}
    t0, emb_t = ref.adaln_single(torch.from_numpy(t), added, batch_size=b, hidden_dtype=x.dtype)
    enc = ref.caption_projection(torch.from_numpy(y)).view(b, -1, x.shape[-1])
    bias = ((1 - torch.from_numpy(mask).to(x.dtype)) * -10000.0).unsqueeze(1)
    kw = dict(attention_mask=None, encoder_hidden_states=enc, encoder_attention_mask=bias, timestep=t0)
    blocks = ref.transformer_blocks
    x = blocks[0](x, **kw)
    for index in range(1, len(ctrl) + 1):
      c, c_skip = ctrl[index - 1](x, c, **kw)
      x = blocks[index](x + c_skip, **kw)
    for index in range(len(ctrl) + 1, len(blocks)):
      x = blocks[index](x, **kw)
    shift, scale = (ref.scale_shift_table[None] + emb_t[:, None]).chunk(2, dim=1)
    x = ref.proj_out(ref.norm_out(x) * (1 + scale) + shift)
    x = x.reshape(-1, h, w, p, p, ref.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x).reshape(-1, ref.out_channels, h * p, w * p)
  return x.numpy().transpose(0, 2, 3, 1).astype(np.float64)


def official_block_dict(block_sd: dict, prefix: str) -> dict:
  """A diffusers BasicTransformerBlock state dict -> official PixArtMSBlock keys under `prefix`."""
  sd = {f"{prefix}scale_shift_table": block_sd["scale_shift_table"]}
  pairs = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q", "cross_attn.proj": "attn2.to_out.0",
           "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
  for kind in ("weight", "bias"):
    sd[f"{prefix}attn.qkv.{kind}"] = torch.cat([block_sd[f"attn1.to_{n}.{kind}"] for n in "qkv"])
    sd[f"{prefix}cross_attn.kv_linear.{kind}"] = torch.cat([block_sd[f"attn2.to_{n}.{kind}"] for n in "kv"])
    for ours, theirs in pairs.items():
      sd[f"{prefix}{ours}.{kind}"] = block_sd[f"{theirs}.{kind}"]
  return sd


def official_controlnet_state_dict(ctrl: nn.ModuleList) -> dict:
  """`controlnet.*` keys of `ControlPixArtHalf.state_dict()`."""
  sd = {}
  for i, blk in enumerate(ctrl):
    sd.update(official_block_dict(blk.copied_block.state_dict(), f"controlnet.{i}.copied_block."))
    for name in ("before_proj", "after_proj"):
      if hasattr(blk, name):
        for kind in ("weight", "bias"):
          sd[f"controlnet.{i}.{name}.{kind}"] = getattr(getattr(blk, name), kind).detach().clone()
  return sd
