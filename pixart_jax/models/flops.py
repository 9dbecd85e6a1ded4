"""Analytic FLOPs of the PixArt-Sigma DiT (matmuls only, 2 FLOPs per multiply-accumulate).

Axis legend: B batch, H W latent height/width, h w token grid (H/p, W/p), L = h*w image tokens, M compressed KV
tokens (h/R * w/R, floor, as the model's `KVCompress.out_grid`), S caption tokens, D hidden width, Dc caption
width, Dm MLP hidden, p patch size.

Counted (per sample unless said otherwise), every matmul of the forward:
  patch embed            L * (p*p*C_in) * D
  timestep embedder      256*D + D*D;  t_block  D * 6D;  micro-conditions (if on) 3 * (256*D/3 + (D/3)^2)
  caption projection     S * (Dc*D + D*D)
  per block  self q k v out   4 * L * D*D
             KV compression   2 * M * R*R * D   (depthwise conv on K and V; 'conv' mode only)
             self QK^T, PV    2 * L * M * D     (M = L without compression)
             cross q, out     2 * L * D*D;  cross k, v  2 * S * D*D;  cross QK^T, PV  2 * L * S * D
             MLP              2 * L * D * Dm
  final layer            L * D * (p*p*C_out)
Not counted: norms, softmax, activations, modulation (elementwise; < 1 % at every size).

The spec (3.6) MAC table is reproduced exactly: 3.31 T MACs at 1024^2, 312.46 T at 4096^2 without KV
compression, 208.56 T with R = 2 in layers 14-27 (-33.3 %).

Training: `dit_train_flops` = 3 x forward (forward + backward = 2 x forward), the usual model-FLOPs convention
for MFU; with full remat the hardware executes one more forward (`remat=True` gives 4 x).
"""
from __future__ import annotations

import dataclasses

from pixart_jax.models.config import DiTConfig

TIMESTEP_FREQ_DIM = 256


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
  """FLOPs (2 x MACs) of one forward of `batch` samples, by part; `total` sums them."""
  embed: float          # patch embed + timestep embedder + t_block (+ micro-conditions)
  caption: float        # caption projection MLP
  self_proj: float      # self-attention q, k, v, out (+ KV compression convs)
  self_attn: float      # self-attention QK^T and PV
  cross_proj: float     # cross-attention q, k, v, out
  cross_attn: float     # cross-attention QK^T and PV
  mlp: float
  final: float

  @property
  def total(self) -> float:
    return sum(dataclasses.astuple(self))

  def as_dict(self) -> dict[str, float]:
    return dict(dataclasses.asdict(self), total=self.total)


def _check_grid(cfg: DiTConfig, latent_h: int, latent_w: int) -> tuple[int, int]:
  if latent_h <= 0 or latent_w <= 0:
    raise ValueError(f"latent size must be positive, got {latent_h}x{latent_w}")
  p = cfg.patch_size
  if latent_h % p or latent_w % p:
    raise ValueError(f"latent {latent_h}x{latent_w} is not divisible by the patch size {p}")
  return latent_h // p, latent_w // p


def compressed_tokens(h: int, w: int, ratio: int, mode: str = "conv") -> int:
  """M: KV tokens after compression of an (h, w) grid by `ratio` (1 = none); floor for conv/ave, ceil for uniform."""
  if ratio <= 1:
    return h * w
  if mode == "uniform":
    return (-(-h // ratio)) * (-(-w // ratio))
  return (h // ratio) * (w // ratio)


def self_attention_flops(h: int, w: int, dim: int, *, ratio: int = 1, mode: str = "conv", batch: int = 1,
                         projections: bool = True) -> float:
  """FLOPs of one self-attention layer on an (h, w) token grid of width `dim` (heads do not change the count).

  projections: include q/k/v/out (4 L D^2) and the KV-compression conv; False = the attention core only
  (QK^T and PV, 2 L M D).
  """
  n = h * w
  m = compressed_tokens(h, w, ratio, mode)
  macs = 2 * n * m * dim
  if projections:
    macs += 4 * n * dim * dim
    if ratio > 1 and mode == "conv":
      macs += 2 * m * ratio * ratio * dim
  return 2.0 * batch * macs


def dit_forward_breakdown(cfg: DiTConfig, latent_h: int, latent_w: int, caption_len: int | None = 300,
                          batch: int = 1) -> FlopBreakdown:
  """Per-part FLOPs of one forward at latent size (latent_h, latent_w) (image size / 8), `caption_len` tokens
  (None = cfg.max_caption_len), `batch` samples."""
  h, w = _check_grid(cfg, latent_h, latent_w)
  s = cfg.max_caption_len if caption_len is None else caption_len
  if s <= 0 or batch <= 0:
    raise ValueError(f"caption_len and batch must be positive, got {s} and {batch}")
  d, dm, p, dc = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size, cfg.caption_channels
  n = h * w
  embed = n * p * p * cfg.in_channels * d + TIMESTEP_FREQ_DIM * d + d * d + d * 6 * d
  if cfg.micro_conditions:
    e = d // 3
    embed += 3 * (TIMESTEP_FREQ_DIM * e + e * e)
  caption = s * (dc * d + d * d)
  self_proj = self_attn = 0
  for layer in range(cfg.depth):
    r = cfg.kv_ratio(layer)
    m = compressed_tokens(h, w, r, cfg.kv_compress_mode)
    self_proj += 4 * n * d * d + (2 * m * r * r * d if r > 1 and cfg.kv_compress_mode == "conv" else 0)
    self_attn += 2 * n * m * d
  cross_proj = cfg.depth * (2 * n * d * d + 2 * s * d * d)
  cross_attn = cfg.depth * 2 * n * s * d
  mlp = cfg.depth * 2 * n * d * dm
  final = n * d * p * p * cfg.out_channels
  macs = [embed, caption, self_proj, self_attn, cross_proj, cross_attn, mlp, final]
  return FlopBreakdown(*[2.0 * batch * x for x in macs])


def dit_forward_flops(cfg: DiTConfig, latent_h: int, latent_w: int, caption_len: int | None = 300,
                      batch: int = 1) -> float:
  """FLOPs (2 x MACs) of one DiT forward; see the module docstring for what is counted."""
  return dit_forward_breakdown(cfg, latent_h, latent_w, caption_len, batch).total


def dit_train_flops(cfg: DiTConfig, latent_h: int, latent_w: int, caption_len: int | None = 300, batch: int = 1,
                    *, remat: bool = False) -> float:
  """FLOPs of one training step (forward + backward): 3 x forward; 4 x with full rematerialisation."""
  return (4.0 if remat else 3.0) * dit_forward_flops(cfg, latent_h, latent_w, caption_len, batch)


def sampling_flops(cfg: DiTConfig, latent_h: int, latent_w: int, steps: int, *, batch: int = 1,
                   guidance: bool = True, caption_len: int | None = 300) -> float:
  """DiT FLOPs of a `steps`-step sampler with one model call per step (DPM-Solver++ multistep, DDIM);
  classifier-free guidance doubles the batch. Excludes T5 and the VAE."""
  if steps <= 0:
    raise ValueError(f"steps must be positive, got {steps}")
  b = batch * (2 if guidance else 1)
  return steps * dit_forward_flops(cfg, latent_h, latent_w, caption_len, b)
