"""The FID InceptionV3 (pool3, 2048-d features) of pytorch-fid, in Flax NNX, NHWC.

Port of pytorch-fid's `InceptionV3(output_blocks=[3])` (src/pytorch_fid/inception.py, mseitzer/pytorch-fid
@b9c18118): torchvision's Inception3 backbone (torchvision/models/inception.py) with the blocks pytorch-fid
swaps in to match TensorFlow's FID graph (`use_fid_inception=True`, the default):

  FIDInceptionA/C/E_1: the pool branch averages a 3x3 window with count_include_pad=False (TF's avg_pool
                       ignores padded zeros); torchvision's blocks count them (count_include_pad=True).
  FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3 MAX pool (TF graph quirk), not an average.

Computation on x: B H W 3 in [0, 1] (`__call__`):
  resize to 299x299, bilinear, align_corners=False, no antialias (torch `F.interpolate`)   (resize_input)
  x = 2x - 1                                                                              (normalize_input)
  Conv2d_1a_3x3 (s2) -> Conv2d_2a_3x3 -> Conv2d_2b_3x3 (p1) -> maxpool 3/2                B 147 147 64 -> 73
  Conv2d_3b_1x1 -> Conv2d_4a_3x3 -> maxpool 3/2                                           B 35 35 192
  Mixed_5b/5c/5d (A) -> Mixed_6a (B) -> Mixed_6b..6e (C)                                  B 17 17 768
  Mixed_7a (D) -> Mixed_7b (E_1) -> Mixed_7c (E_2) -> mean over H W                       B 2048

Every conv is BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU. The BatchNorm
is folded at run time into one per-channel affine, `y = conv(x) * s + (beta - mean * s)` with
`s = gamma / sqrt(var + eps)`, computed in float32.

Parameters are named like the torch modules (`Mixed_6b/branch7x7dbl_2/conv/kernel` (kh kw I O),
`.../bn/{scale,bias,mean,var}`) so the key map in `pixart_jax.convert.inception_keys` is a rename. Logical
axes: conv kernels (None, None, conv_in, conv_out), BatchNorm vectors (norm,): the default rules table
replicates the network (21.8 M parameters); activations are constrained to (batch, ...) at block boundaries.

`width` scales every channel count (tests use tiny widths); 1.0 is the real network. The convs and the
resize run at `precision` (HIGHEST by default: FID features are compared across implementations, and TPU's
default precision would round the fp32 inputs of every conv to bf16).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.parallel.sharding import constrain, param_init

__all__ = ["InceptionConfig", "FIDInceptionV3", "resize_bilinear_matrix", "FEATURE_DIM"]

FEATURE_DIM = 2048
_IMAGE_SIZE = 299
_ACT = ("batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  """pytorch-fid `InceptionV3` options (same names) plus a channel `width` multiplier for tests."""
  use_fid_inception: bool = True  # pytorch-fid's FID blocks (False: torchvision's InceptionA/C/E)
  resize_input: bool = True       # bilinear resize to 299x299 first
  normalize_input: bool = True    # [0, 1] -> [-1, 1]
  width: float = 1.0              # channel multiplier; 1.0 = the released network
  bn_eps: float = 1e-3

  def ch(self, c: int) -> int:
    """Channel count of a layer that has `c` channels in the real network."""
    return max(1, int(round(c * self.width)))

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features (2048 at width 1)."""
    return self.ch(320) + 2 * self.ch(384) * 2 + self.ch(192)


def resize_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of torch's bilinear, align_corners=False, antialias=False resize.

  As aten's `upsample_bilinear2d` (UpSample.h) for float tensors: ratio = float32(in) / out;
  src = max(ratio * (dst + 0.5) - 0.5, 0) rounded once to float32 (the compiled kernel fuses it into one FMA);
  taps i0 = floor(src) and min(i0 + 1, in - 1), weights 1 - l and l = src - i0. This reproduces torch's CPU
  weights bit for bit; positions computed in float64 would move them by up to ~1e-7 * in_size.
  """
  f32 = np.float32
  if in_size == out_size:
    return np.eye(out_size, dtype=f32)
  ratio = np.float64(f32(in_size) / f32(out_size))
  src = np.maximum(ratio * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(f32)  # exact in f64, one rounding
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
  w = np.zeros((out_size, in_size), f32)
  np.add.at(w, (np.arange(out_size), i0), f32(1) - lam)
  np.add.at(w, (np.arange(out_size), i1), lam)
  return w


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class FoldedBatchNorm(nnx.Module):
  """Inference BatchNorm over the last axis: x * s + (beta - mean * s), s = gamma / sqrt(var + eps) (float32)."""

  def __init__(self, n: int, *, eps: float, param_dtype):
    init = lambda fn: param_init(fn, ("norm",))(None, (n,), param_dtype)  # noqa: E731
    self.eps = eps
    self.scale = nnx.Param(init(nnx.initializers.ones_init()))
    self.bias = nnx.Param(init(nnx.initializers.zeros_init()))
    self.mean = nnx.BatchStat(init(nnx.initializers.zeros_init()))
    self.var = nnx.BatchStat(init(nnx.initializers.ones_init()))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (... C) -> (... C) in x's dtype."""
    s = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(self.var[...].astype(jnp.float32) + self.eps)
    shift = self.bias[...].astype(jnp.float32) - self.mean[...].astype(jnp.float32) * s
    return (x.astype(jnp.float32) * s + shift).astype(x.dtype)


class BasicConv2d(nnx.Module):
  """torchvision BasicConv2d: conv (no bias) -> BatchNorm -> ReLU. NHWC."""

  def __init__(self, cfg: InceptionConfig, in_ch: int, out_ch: int, kernel, *, stride=1, padding=0, dtype,
               param_dtype, precision, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(in_ch, out_ch, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                         use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision,
                         kernel_init=param_init(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                         rngs=rngs)
    self.bn = FoldedBatchNorm(out_ch, eps=cfg.bn_eps, param_dtype=param_dtype)
    self.out_ch = out_ch

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: B H W I -> B H' W' O."""
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  """3x3 max pool (torch MaxPool2d / F.max_pool2d: padding never wins)."""
  init = jnp.array(-jnp.inf, x.dtype)
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_3x3(x: jax.Array, count_include_pad: bool) -> jax.Array:
  """F.avg_pool2d(kernel 3, stride 1, padding 1); sums in float32."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  if count_include_pad:
    return (total / 9.0).astype(x.dtype)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), jnp.float32)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return (total / count).astype(x.dtype)


def _conv_factory(cfg: InceptionConfig, **kw):
  """BasicConv2d(in, out, kernel, stride=, padding=) with the block's shared settings."""
  return lambda in_ch, out_ch, kernel, **more: BasicConv2d(cfg, in_ch, out_ch, kernel, **more, **kw)


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cfg: InceptionConfig, in_ch: int, pool_features: int, **kw):
    conv, self.cfg = _conv_factory(cfg, **kw), cfg
    c = cfg.ch
    self.branch1x1 = conv(in_ch, c(64), 1)
    self.branch5x5_1 = conv(in_ch, c(48), 1)
    self.branch5x5_2 = conv(c(48), c(64), 5, padding=2)
    self.branch3x3dbl_1 = conv(in_ch, c(64), 1)
    self.branch3x3dbl_2 = conv(c(64), c(96), 3, padding=1)
    self.branch3x3dbl_3 = conv(c(96), c(96), 3, padding=1)
    self.branch_pool = conv(in_ch, c(pool_features), 1)
    self.out_ch = c(64) + c(64) + c(96) + c(pool_features)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3(x, count_include_pad=not self.cfg.use_fid_inception))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, cfg: InceptionConfig, in_ch: int, **kw):
    conv, self.cfg = _conv_factory(cfg, **kw), cfg
    c = cfg.ch
    self.branch3x3 = conv(in_ch, c(384), 3, stride=2)
    self.branch3x3dbl_1 = conv(in_ch, c(64), 1)
    self.branch3x3dbl_2 = conv(c(64), c(96), 3, padding=1)
    self.branch3x3dbl_3 = conv(c(96), c(96), 3, stride=2)
    self.out_ch = c(384) + c(96) + in_ch

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

  def __init__(self, cfg: InceptionConfig, in_ch: int, channels_7x7: int, **kw):
    conv, self.cfg = _conv_factory(cfg, **kw), cfg
    c, c7 = cfg.ch, cfg.ch(channels_7x7)
    self.branch1x1 = conv(in_ch, c(192), 1)
    self.branch7x7_1 = conv(in_ch, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, c(192), (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_ch, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, c(192), (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_ch, c(192), 1)
    self.out_ch = 4 * c(192)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_3x3(x, count_include_pad=not self.cfg.use_fid_inception))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, cfg: InceptionConfig, in_ch: int, **kw):
    conv, self.cfg = _conv_factory(cfg, **kw), cfg
    c = cfg.ch
    self.branch3x3_1 = conv(in_ch, c(192), 1)
    self.branch3x3_2 = conv(c(192), c(320), 3, stride=2)
    self.branch7x7x3_1 = conv(in_ch, c(192), 1)
    self.branch7x7x3_2 = conv(c(192), c(192), (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(c(192), c(192), (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(c(192), c(192), 3, stride=2)
    self.out_ch = c(320) + c(192) + in_ch

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  pool: "avg" (torchvision, count_include_pad=True), "avg_fid" (FIDInceptionE_1, count_include_pad=False) or
  "max" (FIDInceptionE_2).
  """

  def __init__(self, cfg: InceptionConfig, in_ch: int, pool: str, **kw):
    conv, self.cfg = _conv_factory(cfg, **kw), cfg
    c = cfg.ch
    self.pool = pool
    self.branch1x1 = conv(in_ch, c(320), 1)
    self.branch3x3_1 = conv(in_ch, c(384), 1)
    self.branch3x3_2a = conv(c(384), c(384), (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(c(384), c(384), (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_ch, c(448), 1)
    self.branch3x3dbl_2 = conv(c(448), c(384), 3, padding=1)
    self.branch3x3dbl_3a = conv(c(384), c(384), (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(c(384), c(384), (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_ch, c(192), 1)
    self.out_ch = c(320) + 4 * c(384) + c(192)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _max_pool(x, 1, pad=1) if self.pool == "max" else _avg_pool_3x3(x, self.pool == "avg")
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's InceptionV3 up to pool3: images B H W 3 in [0, 1] -> features B 2048 (float32).

  Args:
    config: options (FID or torchvision blocks, resize, normalisation, width).
    dtype: compute dtype (float32 by default; bfloat16 halves memory at a cost in feature precision).
    param_dtype: storage dtype of the weights.
    precision: precision of the convs and of the resize (jax.lax.Precision or None for the backend default).
  """

  def __init__(self, config: InceptionConfig = InceptionConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32,
               precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    self.config, self.dtype, self.precision = config, dtype, precision
    c = config.ch
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(config, 3, c(32), 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(config, c(32), c(32), 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(config, c(32), c(64), 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(config, c(64), c(80), 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(config, c(80), c(192), 3, **kw)
    self.Mixed_5b = InceptionA(config, c(192), 32, **kw)
    self.Mixed_5c = InceptionA(config, self.Mixed_5b.out_ch, 64, **kw)
    self.Mixed_5d = InceptionA(config, self.Mixed_5c.out_ch, 64, **kw)
    self.Mixed_6a = InceptionB(config, self.Mixed_5d.out_ch, **kw)
    self.Mixed_6b = InceptionC(config, self.Mixed_6a.out_ch, 128, **kw)
    self.Mixed_6c = InceptionC(config, self.Mixed_6b.out_ch, 160, **kw)
    self.Mixed_6d = InceptionC(config, self.Mixed_6c.out_ch, 160, **kw)
    self.Mixed_6e = InceptionC(config, self.Mixed_6d.out_ch, 192, **kw)
    self.Mixed_7a = InceptionD(config, self.Mixed_6e.out_ch, **kw)
    fid = config.use_fid_inception
    self.Mixed_7b = InceptionE(config, self.Mixed_7a.out_ch, "avg_fid" if fid else "avg", **kw)
    self.Mixed_7c = InceptionE(config, self.Mixed_7b.out_ch, "max" if fid else "avg", **kw)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """images: B H W 3 in [0, 1] -> the network input B 299 299 3 (float32; resized and/or normalised)."""
    x = images.astype(jnp.float32)
    if self.config.resize_input:
      rows = jnp.asarray(resize_bilinear_matrix(x.shape[1], _IMAGE_SIZE), jnp.float32)   # O H
      cols = jnp.asarray(resize_bilinear_matrix(x.shape[2], _IMAGE_SIZE), jnp.float32)   # P W
      x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=self.precision)
      x = jnp.einsum("pw,bowc->bopc", cols, x, precision=self.precision)
    if self.config.normalize_input:
      x = 2.0 * x - 1.0
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """images: B H W 3 in [0, 1] (any H W; at least 75x75 without resize_input) -> pool3 features B 2048 f32."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3) NHWC, got shape {images.shape}")
    x = constrain(self.preprocess(images).astype(self.dtype), _ACT)
    for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
      x = layer(x)
    x = constrain(_max_pool(x, 2), _ACT)
    x = constrain(_max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2), _ACT)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = constrain(block(x), _ACT)
    return constrain(jnp.mean(x.astype(jnp.float32), axis=(1, 2)), ("batch", None))
