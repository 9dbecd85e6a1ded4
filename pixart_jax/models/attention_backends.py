"""Attention backends behind one enum: `xla` (the materialised reference), `blockwise` (memory-efficient, plain
JAX), `splash` (Pallas TPU kernel), `cudnn` (GPU flash attention), and `auto` (the default) that picks one of them.

Axis legend: B batch, L query tokens, M key/value tokens, N heads, K head dim.

`attend` is what the attention modules call: it resolves `auto` (`resolve_backend`: splash on TPU, cuDNN on GPU
for bf16/fp16, blockwise otherwise: fp32 on GPU, and the CPU), falls back to `xla` for small problems
(`select_backend`), and under an active mesh (`jax.set_mesh`) wraps the splash and blockwise kernels in
`jax.shard_map` (batch by `parallel.sharding.batch_spec`, heads over `tensor`, query tokens over `sequence`).
`attend_local` is the same computation on per-device blocks, for callers already inside a `shard_map`
(`pixart_jax.parallel.context`).

Blockwise details: `models/blockwise_attention.py`.

Splash details: q is pre-scaled by 1/sqrt(K) (the kernel does not scale); the head dim is zero-padded to a
multiple of 128 and the token axes to block multiples; padded and masked keys get segment id 0 while every
query has segment id 1, so the kernel's segment mask is exactly the key-padding mask. Softmax statistics are
fp32 inside the kernel. On a non-TPU backend the kernel runs in Pallas interpret mode (slow; for tests).
A sample whose key mask is all False gets the plain average of its values from `xla` (all logits equal -1e30);
splash averages over its padded key block instead (zeros included) and cudnn is undefined there. PixArt
captions always keep at least the EOS token, so this never arises in the model.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Mapping

import einops
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import AxisType, PartitionSpec as P

from pixart_jax.enums import ParsedEnum
from pixart_jax.models.blockwise_attention import BLOCK_KV, BLOCK_Q, MASK_VALUE as _MASK_VALUE, blockwise_local, round_up
from pixart_jax.parallel.sharding import batch_spec, dim_spec

log = logging.getLogger(__name__)

_LANES = 128


class AttentionBackend(ParsedEnum, what="attention backend"):
  AUTO = "auto"
  XLA = "xla"
  BLOCKWISE = "blockwise"
  SPLASH = "splash"
  CUDNN = "cudnn"


@dataclasses.dataclass(frozen=True)
class SplashBlockSizes:
  """Splash tile sizes (multiples of 128; block_kv a multiple of block_kv_compute). The backward kernels use
  the same sizes. Each is clipped to the (128-rounded) sequence length."""
  block_q: int = 512
  block_kv: int = 512
  block_kv_compute: int = 512

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_kv_compute"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0 or v % _LANES:
        raise ValueError(f"splash {name} must be a positive multiple of {_LANES}, got {v!r}")
    if self.block_kv % self.block_kv_compute:
      raise ValueError(f"splash block_kv {self.block_kv} is not a multiple of block_kv_compute "
                       f"{self.block_kv_compute}")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """How attention runs (never what it computes, never the parameters); the one value that carries it, from the
  experiment config (`config.model.attention`) through `models.spec.ModelSpec` to every attention layer.

  backend: "auto" (default: `resolve_backend` picks by platform and dtype) | "xla" (materialised reference) |
    "blockwise" (memory-efficient, any platform) | "splash" (Pallas TPU kernel; interpret mode elsewhere) |
    "cudnn" (GPU, bf16/fp16).
  min_seq: splash / cudnn fall back to xla below this many key/value tokens (e.g. the 300-token
    cross-attention with the default 1024); blockwise falls back when L * M < min_seq ** 2 (its memory bound
    matters for the cross-attention of a 4K image too).
  block_sizes: splash tiles (block_q, block_kv, block_kv_compute), multiples of 128, clipped to the sequence;
    a 3-sequence (a JSON round trip gives a list) is accepted.
  blockwise_block_q, blockwise_block_kv: blockwise tiles (query / key tokens per tile, clipped to the sequence;
    one fp32 tile is block_q * block_kv * 4 bytes per batch row and head). The defaults (a 16 MiB tile) are the
    fastest measured on a shared 2-core Xeon (bench/results/blockwise_attention.md): large enough to keep the CPU
    matmuls near peak, small enough that the tile passes stay in cache under load (8192 x 1024 ran 15-30 % slower).
  interpret: run splash in Pallas interpret mode; None = iff the backend is not a TPU.
  sequence_parallel: under a mesh with a `sequence` axis > 1, self-attention shards tokens by grid rows and
    all-gathers (compressed) K/V explicitly (pixart_jax.parallel.context).
  """
  backend: AttentionBackend = AttentionBackend.AUTO
  min_seq: int = 1024
  block_sizes: SplashBlockSizes = SplashBlockSizes()
  interpret: bool | None = None
  sequence_parallel: bool = False
  blockwise_block_q: int = BLOCK_Q
  blockwise_block_kv: int = BLOCK_KV

  def __post_init__(self):
    object.__setattr__(self, "backend", AttentionBackend.parse(self.backend))
    blocks = self.block_sizes
    if not isinstance(blocks, SplashBlockSizes):
      blocks = tuple(blocks)
      if len(blocks) != 3:
        raise ValueError(f"attention block_sizes must be (block_q, block_kv, block_kv_compute), got {blocks!r}")
      object.__setattr__(self, "block_sizes", SplashBlockSizes(*(int(b) for b in blocks)))
    if not isinstance(self.min_seq, int) or self.min_seq < 0:
      raise ValueError(f"attention min_seq must be an int >= 0, got {self.min_seq!r}")
    for name in ("blockwise_block_q", "blockwise_block_kv"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 8:
        raise ValueError(f"attention {name} must be an int >= 8, got {v!r}")

  @classmethod
  def parse(cls, value: "AttentionOptions | AttentionBackend | str | Mapping | None") -> "AttentionOptions":
    """None -> the defaults (auto); a backend (or its name) -> the defaults with that backend; a mapping with the
    field names (`config.model.attention`, None values keep the defaults) -> those options."""
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    if isinstance(value, (str, AttentionBackend)):
      return cls(backend=value)
    if isinstance(value, Mapping) or hasattr(value, "items"):
      given = {k: v for k, v in dict(value).items() if v is not None}
      fields = {f.name for f in dataclasses.fields(cls)}
      unknown = sorted(set(given) - fields)
      if unknown:
        raise ValueError(f"unknown attention options {unknown}; known: {sorted(fields)}")
      return cls(**given)
    raise ValueError(f"attention must be AttentionOptions, a backend name or a mapping of its fields, got "
                     f"{value!r}")


XLA_OPTIONS = AttentionOptions(backend=AttentionBackend.XLA)
AUTO_OPTIONS = AttentionOptions()


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """The reference: softmax(q k^T / sqrt(K)) v with fp32 logits and softmax.

  q (B L N K), k v (B M N K), mask (B M) bool key mask (True = attend) or None -> (B L N K) in q's dtype.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("blnk,bmnk->bnlm", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bnlm,bmnk->blnk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_backend(backend: AttentionBackend | str, dtype, platform: str | None = None
                    ) -> tuple[AttentionBackend, str]:
  """(the concrete backend, why) for `backend` on `platform` (None: `jax.default_backend()`) with activations of
  `dtype`. An explicit backend is returned as is; `auto` is splash on TPU, cuDNN flash attention on GPU for
  bf16/fp16, and blockwise for everything else (fp32 on GPU, the CPU): never the L x M logits."""
  backend = AttentionBackend.parse(backend)
  if backend is not AttentionBackend.AUTO:
    return backend, "set explicitly"
  platform = jax.default_backend() if platform is None else platform
  dtype = jnp.dtype(dtype)
  if platform == "tpu":
    return AttentionBackend.SPLASH, "platform tpu: the splash Pallas kernel"
  if platform in ("gpu", "cuda", "rocm") and dtype in _HALF:
    return AttentionBackend.CUDNN, f"platform {platform} with {dtype.name} activations: cuDNN flash attention"
  if platform in ("gpu", "cuda", "rocm"):
    return AttentionBackend.BLOCKWISE, (f"platform {platform} with {dtype.name} activations (cuDNN flash attention "
                                        "needs bf16/fp16): blockwise")
  return AttentionBackend.BLOCKWISE, f"platform {platform}: blockwise (online softmax, no L x M logits)"


@functools.lru_cache(maxsize=None)
def _log_choice(platform: str, dtype: str, backend: AttentionBackend, why: str) -> None:
  """Logs the auto choice once per (platform, dtype) in a process (the cache is what makes it once)."""
  log.info("attention='auto' on %s with %s activations -> %r (%s)", platform, dtype, backend.value, why)


def resolve(opts: AttentionOptions, dtype, platform: str | None = None) -> AttentionOptions:
  """`opts` with `auto` replaced by the concrete backend for this platform and dtype (trace time; logged once).
  Explicit backends come back unchanged."""
  if opts.backend is not AttentionBackend.AUTO:
    return opts
  platform = jax.default_backend() if platform is None else platform
  backend, why = resolve_backend(opts.backend, dtype, platform)
  _log_choice(platform, jnp.dtype(dtype).name, backend, why)
  return dataclasses.replace(opts, backend=backend)


def select_backend(opts: AttentionOptions, kv_len: int, q_len: int | None = None) -> AttentionBackend:
  """The backend that runs for `q_len` queries and `kv_len` key/value tokens (opts resolved, not auto):
  opts.backend, or xla when the problem is small (splash / cudnn: kv_len < min_seq; blockwise: q_len * kv_len <
  min_seq ** 2, with q_len = kv_len when not given)."""
  if opts.backend is AttentionBackend.AUTO:
    raise ValueError("select_backend needs a resolved backend (attention_backends.resolve), got 'auto'")
  if opts.backend is AttentionBackend.BLOCKWISE:
    small = (kv_len if q_len is None else q_len) * kv_len < opts.min_seq ** 2
  else:
    small = kv_len < opts.min_seq
  return AttentionBackend.XLA if small else opts.backend


def _fit_blocks(bs: SplashBlockSizes, q_len: int, kv_len: int) -> splash.BlockSizes:
  bq = min(bs.block_q, round_up(q_len, _LANES))
  bkv = min(bs.block_kv, round_up(kv_len, _LANES))
  bkc = min(bs.block_kv_compute, bkv)
  while bkv % bkc:  # largest multiple of 128 <= block_kv_compute that divides the clipped block_kv
    bkc -= _LANES
  return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkc, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkc, block_q_dq=bq, block_kv_dq=bkv)


def splash_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                 block_sizes: SplashBlockSizes = SplashBlockSizes(), interpret: bool | None = None) -> jax.Array:
  """Splash attention on one device's blocks. q (B L N K), k v (B M N K), mask (B M) bool -> (B L N K)."""
  b, l, n, kd = q.shape
  m = k.shape[1]
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  blocks = _fit_blocks(block_sizes, l, m)
  lp, mp, kp = round_up(l, blocks.block_q), round_up(m, blocks.block_kv), round_up(kd, _LANES)
  scale = 1.0 / math.sqrt(kd)
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)

  def prep(t, length):  # (B T N K) -> (B N Tp Kp), zero padded
    t = einops.rearrange(t, "b t n k -> b n t k")
    return jnp.pad(t, ((0, 0), (0, 0), (0, length - t.shape[2]), (0, kp - kd)))

  qp, kpad, vpad = prep(q, lp), prep(k, mp), prep(v, mp)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((lp, mp))] * n), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  if mask is None and mp == m:
    out = jax.vmap(kernel)(qp, kpad, vpad)
  else:
    valid = jnp.ones((b, m), jnp.int32) if mask is None else mask.astype(jnp.int32)
    kv_ids = jnp.pad(valid, ((0, 0), (0, mp - m)))  # padded keys: segment 0, never attended
    q_ids = jnp.ones((b, lp), jnp.int32)
    out = jax.vmap(lambda a, c, d, qi, ki: kernel(a, c, d, segment_ids=splash.SegmentIds(qi, ki)))(
        qp, kpad, vpad, q_ids, kv_ids)
  return einops.rearrange(out[:, :, :l, :kd], "b n l k -> b l n k").astype(q.dtype)


def cudnn_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """cuDNN flash attention (GPU only, bf16/fp16). Shapes as `dot_product_attention`."""
  if jax.default_backend() != "gpu":
    raise ValueError(f"attention backend 'cudnn' needs a GPU, but JAX runs on {jax.default_backend()!r}; "
                     "use attention='xla' (or 'splash' on TPU)")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention backend 'cudnn' needs bfloat16 or float16 activations, got {q.dtype}; "
                     "use attention='xla' for float32")
  m4 = None  # cuDNN takes the mask as a (B 1 L M) bias: the query axis cannot broadcast
  if mask is not None:
    m4 = jnp.broadcast_to(mask.astype(bool)[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=m4, implementation="cudnn")


def attend_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                 opts: AttentionOptions = AUTO_OPTIONS) -> jax.Array:
  """Dispatch without any sharding logic (per-device blocks or a single device). Shapes as
  `dot_product_attention`."""
  opts = resolve(opts, q.dtype)
  backend = select_backend(opts, k.shape[1], q.shape[1])
  if backend is AttentionBackend.SPLASH:
    return splash_local(q, k, v, mask, block_sizes=opts.block_sizes, interpret=opts.interpret)
  if backend is AttentionBackend.CUDNN:
    return cudnn_local(q, k, v, mask)
  if backend is AttentionBackend.BLOCKWISE:
    return blockwise_local(q, k, v, mask, block_q=opts.blockwise_block_q, block_kv=opts.blockwise_block_kv)
  return dot_product_attention(q, k, v, mask)


def auto_mesh():
  """The enclosing mesh if it has an axis of size > 1 that is not already manual (else None)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  free = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual and mesh.shape[a] > 1]
  return mesh if free else None


def _sharded(q, k, v, mask, opts: AttentionOptions, mesh) -> jax.Array:
  """A per-device kernel (splash, blockwise) under `mesh`: batch, heads over `tensor`, queries over `sequence`;
  K/V replicated along the query shards."""
  b, l, n, _ = q.shape
  bspec = batch_spec(mesh, None, (b,))[0]
  hspec = dim_spec(mesh, ("tensor",), n)
  lspec = dim_spec(mesh, ("sequence",), l)
  free = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}  # made manual here
  q_spec, kv_spec = P(bspec, lspec, hspec, None), P(bspec, None, hspec, None)
  fn = lambda q_, k_, v_, m_: attend_local(q_, k_, v_, m_, opts=opts)
  m_spec = None if mask is None else P(bspec, None)
  # check_vma=False for splash: pallas_call outputs carry no varying-axes type.
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, m_spec), out_specs=q_spec,
                       axis_names=free, check_vma=opts.backend is not AttentionBackend.SPLASH)(q, k, v, mask)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
           opts: AttentionOptions = AUTO_OPTIONS) -> jax.Array:
  """Attention by the configured backend. q (B L N K), k v (B M N K), mask (B M) bool or None -> (B L N K).

  Splash and blockwise under a mesh run inside `jax.shard_map` (per-device loops over tiles); xla and cudnn are
  left to the compiler's partitioner.
  """
  opts = resolve(opts, q.dtype)
  backend = select_backend(opts, k.shape[1], q.shape[1])
  if backend in (AttentionBackend.SPLASH, AttentionBackend.BLOCKWISE):
    mesh = auto_mesh()
    if mesh is not None:
      return _sharded(q, k, v, mask, opts, mesh)
  return attend_local(q, k, v, mask, opts=opts)

