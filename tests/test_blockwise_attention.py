"""Blockwise attention (online softmax over key/value tiles, custom VJP recomputing tiles from the log-sum-exp)
equals the materialised xla reference in fp32, forward and every gradient, with caption masks, Lq != Lk, ragged
lengths, under shard_map (sequence parallel and `attend` under a mesh) and inside the DiT; never holds the L x M
logits; and `attention="auto"` picks per platform and dtype.

Small tiles (tens of tokens) make every case run many tiles, ragged tails and the online rescaling included.
Errors are max |got - want| / max |want| per array.
"""
import dataclasses
import logging

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixart_jax.models.attention import CrossAttention, SelfAttention
from pixart_jax.models.attention_backends import (AttentionBackend, AttentionOptions, attend, dot_product_attention,
                                                  resolve, resolve_backend, select_backend)
from pixart_jax.models.blockwise_attention import blockwise_local
from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel import context
from pixart_jax.parallel.mesh import make_mesh

TOL = 1e-5
XLA = AttentionOptions(backend=AttentionBackend.XLA)
BLOCKWISE = AttentionOptions(backend=AttentionBackend.BLOCKWISE, min_seq=0, blockwise_block_q=40,
                             blockwise_block_kv=24)
KW = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def primitives(fn, *args) -> set[str]:
  """Names of every primitive in fn's jaxpr, sub-jaxprs (loops, custom_vjp, shard_map) included."""
  names = set()

  def walk(j):
    for eqn in j.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def rel(got, want) -> float:
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


def qkv(b, l, m, n, kd, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, l, n, kd)).astype(np.float32)
  k = rng.standard_normal((b, m, n, kd)).astype(np.float32)
  v = rng.standard_normal((b, m, n, kd)).astype(np.float32)
  c = rng.standard_normal((b, l, n, kd)).astype(np.float32)  # the cotangent
  return q, k, v, c


def fwd_and_grads(fn, q, k, v, c):
  """fn(q, k, v) and d(sum(out * c))/d(q, k, v), jitted."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * c)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return jax.jit(fn)(q, k, v), grads


def assert_matches_xla(q, k, v, c, mask=None, tol=TOL, **blocks):
  out, grads = fwd_and_grads(lambda q, k, v: blockwise_local(q, k, v, mask, **blocks), q, k, v, c)
  want, want_grads = fwd_and_grads(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v, c)
  assert rel(out, want) <= tol
  for name, g, w in zip("qkv", grads, want_grads):
    assert rel(g, w) <= tol, (name, rel(g, w))


@pytest.mark.parametrize("l,m,blocks", [
    (96, 96, dict(block_q=32, block_kv=32)),      # self-attention, exact tiles
    (100, 37, dict(block_q=32, block_kv=16)),     # Lq != Lk (KV compression), both ragged
    (77, 150, dict(block_q=512, block_kv=40)),    # one query tile, ragged key tiles
], ids=["self", "ragged-lq-ne-lk", "one-q-tile"])
def test_forward_and_grads_match_xla(l, m, blocks):
  q, k, v, c = qkv(2, l, m, 3, 72, seed=l + m)
  assert_matches_xla(q, k, v, c, **blocks)


def test_head_dim_multiple_of_16_sums_separately():
  """K = 64 has no spare lane column for the row sum: the separate-sum branch."""
  q, k, v, c = qkv(1, 70, 50, 2, 64, seed=3)
  assert_matches_xla(q, k, v, c, block_q=32, block_kv=16)


def test_caption_masks_and_padding():
  """Per-sample key padding masks (2 and 45 of 45 keys) on ragged key tiles: masked and padded keys are both
  excluded; the mask really matters."""
  q, k, v, c = qkv(2, 64, 45, 2, 72, seed=4)
  mask = np.arange(45)[None] < np.array([[2], [45]])
  assert_matches_xla(q, k, v, c, mask, block_q=24, block_kv=16)
  assert rel(blockwise_local(q, k, v, mask), dot_product_attention(q, k, v)) > 1e-2


def test_fully_masked_sample_matches_xla_forward():
  """A sample whose keys are all masked: the plain average of its (unpadded) values, like the xla reference."""
  q, k, v, _ = qkv(2, 20, 30, 2, 72, seed=5)
  mask = np.arange(30)[None] < np.array([[0], [7]])
  got = blockwise_local(q, k, v, mask, block_q=8, block_kv=16)  # 30 keys -> 2 tiles of 16, 2 padded keys
  assert rel(got, dot_product_attention(q, k, v, mask)) <= TOL


def perturbed(state, scale: float, seed: int):
  """Parameters moved off their (often zero) init, so every gradient is exercised."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape).astype(a.dtype), state)


def assert_same_outputs_and_grads(reference, got):
  """(output, gradient tree) pairs: output within TOL relative, every gradient within TOL of the largest."""
  (o_ref, g_ref), (o, g) = reference, got
  assert rel(o, o_ref) <= TOL
  gmax = max(float(np.abs(a).max()) for a in jax.tree.leaves(g_ref))
  worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), g, g_ref)))
  assert worst / gmax <= TOL


def test_modules_match_xla():
  """Self-attention with qk-norm and conv KV compression (140 queries, 35 keys) and masked cross-attention through
  `attend` with the blockwise backend: forward and gradients w.r.t. the input and every parameter."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 140, 32)).astype(np.float32)
  y = rng.standard_normal((2, 16, 32)).astype(np.float32)
  mask = np.arange(16)[None] < np.array([[1], [11]])
  cases = [(lambda o: SelfAttention(32, 2, kv_ratio=2, qk_norm=True, rngs=nnx.Rngs(0), opts=o, **KW), (x, (10, 14))),
           (lambda o: CrossAttention(32, 2, rngs=nnx.Rngs(0), opts=o, **KW), (x, y, mask))]
  for make, args in cases:
    results = []
    for opts in (XLA, BLOCKWISE):
      graphdef, state = nnx.split(make(opts))
      state = perturbed(state, 0.2, seed=0)
      loss = lambda s, x0: jnp.sum(nnx.merge(graphdef, s)(x0, *args[1:]) ** 2)
      out = jax.jit(lambda s, x0: nnx.merge(graphdef, s)(x0, *args[1:]))(state, args[0])
      results.append((out, jax.jit(jax.grad(loss, argnums=(0, 1)))(state, args[0])))
    assert_same_outputs_and_grads(*results)


def test_attend_under_mesh_runs_in_shard_map():
  """`attend` under a data x tensor x sequence mesh runs blockwise per device inside jax.shard_map."""
  q, k, v, c = qkv(2, 96, 40, 4, 72, seed=7)
  mask = np.arange(40)[None] < np.array([[9], [40]])
  fn = lambda q, k, v: attend(q, k, v, mask, opts=BLOCKWISE)
  want, want_grads = fwd_and_grads(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v, c)
  with jax.set_mesh(make_mesh([("data", 2), ("tensor", 2), ("sequence", 2)])):
    names = primitives(fn, q, k, v)
    out, grads = fwd_and_grads(fn, q, k, v, c)
  assert {"shard_map", "custom_vjp_call"} <= names
  assert rel(out, want) <= TOL
  for g, w in zip(grads, want_grads):
    assert rel(g, w) <= TOL


@pytest.mark.parametrize("kv_ratio", [1, 2], ids=["full-kv", "kv2"])
def test_sequence_parallel_on_8_devices(kv_ratio):
  """Tokens sharded over `sequence` (8 devices, each attends its 16 rows... of queries to the all-gathered K/V,
  blockwise inside the shard_map with check_vma on): the unsharded xla module's output and gradients."""
  hw = (16, 8)
  rng = np.random.default_rng(8)
  x = rng.standard_normal((1, 128, 48)).astype(np.float32)
  results = []
  for opts, mesh in ((XLA, None), (dataclasses.replace(BLOCKWISE, sequence_parallel=True),
                                   make_mesh([("sequence", 8)]))):
    layer = SelfAttention(48, 4, kv_ratio=kv_ratio, rngs=nnx.Rngs(0), opts=opts, **KW)
    graphdef, state = nnx.split(layer)
    state = jax.tree.map(lambda a: a + 0.2 * np.random.default_rng(1).standard_normal(a.shape).astype(a.dtype),
                         state)
    fn = lambda s, x0: nnx.merge(graphdef, s)(x0, hw)
    grad = jax.grad(lambda s, x0: jnp.sum(fn(s, x0) ** 2), argnums=(0, 1))
    if mesh is None:
      results.append((jax.jit(fn)(state, x), jax.jit(grad)(state, x), set()))
      continue
    with jax.set_mesh(mesh):
      assert context.sequence_shards() == 8
      names = primitives(fn, state, x)
      results.append((jax.jit(fn)(state, x), jax.jit(grad)(state, x), names))
  (o_ref, g_ref, _), (o, g, names) = results
  assert {"all_gather", "custom_vjp_call"} <= names, names  # the explicit sequence-parallel path, blockwise
  assert rel(o, o_ref) <= TOL
  gmax = max(float(np.abs(a).max()) for a in jax.tree.leaves(g_ref))
  worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), g, g_ref)))
  assert worst / gmax <= TOL


def test_dit_forward_and_grads_match_xla():
  """One tiny DiT (KV compression in layer 1, caption masks) forward + parameter gradients: blockwise vs xla."""
  cfg = get_preset("tiny", kv_compress_layers=(1,))
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2, 16, 12, 4)).astype(np.float32)
  t = np.array([3.0, 800.0], np.float32)
  y = rng.standard_normal((2, 16, 32)).astype(np.float32)
  mask = (np.arange(16)[None] < np.array([[2], [16]])).astype(np.int32)
  results = []
  for opts in (XLA, BLOCKWISE):
    graphdef, state = nnx.split(PixArtSigma(cfg, attention=opts, rngs=nnx.Rngs(0)))
    state = perturbed(state, 0.05, seed=2)
    fn = lambda s: nnx.merge(graphdef, s)(x, t, y, mask)
    results.append((jax.jit(fn)(state), jax.jit(jax.grad(lambda s: jnp.sum(fn(s) ** 2)))(state)))
  assert_same_outputs_and_grads(*results)


def test_never_materialises_the_logits():
  """fwd + bwd at 4096 tokens x 2 heads: the compiled temporaries stay far below one (N L M) fp32 logits array
  (128 MiB) and the residuals are the inputs, the output and the (B L N) log-sum-exp."""
  q = jax.ShapeDtypeStruct((1, 4096, 2, 72), jnp.float32)
  fn = lambda q, k, v: blockwise_local(q, k, v, block_q=512, block_kv=256)
  vjp = jax.jit(lambda q, k, v, c: jax.vjp(fn, q, k, v)[1](c))
  temp = vjp.lower(q, q, q, q).compile().memory_analysis().temp_size_in_bytes
  logits = 2 * 4096 * 4096 * 4
  assert temp < logits / 8, (temp, logits)
  _, residuals = jax.vjp(fn, *(jnp.zeros(q.shape, q.dtype) for _ in range(3)))
  sizes = sorted(a.size for a in jax.tree.leaves(residuals))
  assert max(sizes) == 4096 * 2 * 72 and min(sizes) == 4096 * 2  # q/k/v/out, and the lse (1 L N)


@pytest.mark.parametrize("platform,dtype,want", [
    ("tpu", jnp.bfloat16, AttentionBackend.SPLASH), ("tpu", jnp.float32, AttentionBackend.SPLASH),
    ("gpu", jnp.bfloat16, AttentionBackend.CUDNN), ("gpu", jnp.float16, AttentionBackend.CUDNN),
    ("gpu", jnp.float32, AttentionBackend.BLOCKWISE), ("cpu", jnp.float32, AttentionBackend.BLOCKWISE),
    ("cpu", jnp.bfloat16, AttentionBackend.BLOCKWISE)])
def test_auto_resolves_per_platform_and_dtype(platform, dtype, want):
  assert AttentionOptions().backend is AttentionBackend.AUTO  # the default everywhere
  backend, why = resolve_backend("auto", dtype, platform)
  assert backend is want and why
  assert resolve(AttentionOptions(min_seq=7), dtype, platform) == AttentionOptions(backend=want, min_seq=7)
  for explicit in (AttentionBackend.XLA, AttentionBackend.SPLASH, AttentionBackend.BLOCKWISE):
    assert resolve_backend(explicit, dtype, platform)[0] is explicit
    assert resolve(AttentionOptions(backend=explicit), dtype, platform).backend is explicit


def test_auto_logged_once_and_runs_blockwise_on_cpu(caplog):
  q, k, v, _ = qkv(1, 1100, 1100, 1, 8, seed=10)  # 1100^2 logits >= min_seq^2: blockwise, not the fallback
  with caplog.at_level(logging.INFO, logger="pixart_jax.models.attention_backends"):
    resolve(AttentionOptions(), jnp.float16, "cpu")
    resolve(AttentionOptions(), jnp.float16, "cpu")
    names = primitives(lambda q, k, v: attend(q, k, v), q, k, v)
  assert sum("float16" in r.getMessage() and "'blockwise'" in r.getMessage() for r in caplog.records) == 1
  assert "custom_vjp_call" in names  # blockwise, not the materialised reference
  assert rel(attend(q, k, v), dot_product_attention(q, k, v)) <= TOL


def test_small_problems_fall_back_to_xla_and_options_are_validated():
  opts = AttentionOptions(backend=AttentionBackend.BLOCKWISE)
  assert select_backend(opts, 300, 4096) is AttentionBackend.BLOCKWISE  # 4K-image cross-attention: bounded
  assert select_backend(opts, 300, 1024) is AttentionBackend.XLA         # 300K logits: materialising is fine
  assert select_backend(opts, 1024) is AttentionBackend.BLOCKWISE
  with pytest.raises(ValueError, match="resolved backend"):
    select_backend(AttentionOptions(), 4096)
  with pytest.raises(ValueError, match="blockwise_block_q must be an int >= 8, got 0"):
    AttentionOptions(blockwise_block_q=0)
  parsed = AttentionOptions.parse({"backend": "blockwise", "blockwise_block_kv": 256, "min_seq": None})
  assert parsed == AttentionOptions(backend=AttentionBackend.BLOCKWISE, blockwise_block_kv=256)
  assert ModelSpec(get_preset("tiny")).attention.backend is AttentionBackend.AUTO


def test_planner_resolves_auto_for_the_mesh_platform():
  """The planner compiles for a TPU topology from a CPU host: auto must plan splash there, blockwise on the CPU."""
  from pixart_jax.parallel.planning import Workload

  work = Workload(get_preset("tiny"), (16, 16), 2)
  assert work.attention.backend is AttentionBackend.AUTO
  assert work.spec("none", "tpu").attention.backend is AttentionBackend.SPLASH
  assert work.spec("none", "cpu").attention.backend is AttentionBackend.BLOCKWISE
  assert Workload(get_preset("tiny"), (16, 16), 2, attention="xla").spec("none", "tpu").attention == XLA


def test_bf16_inputs_keep_fp32_statistics():
  """bf16 q/k/v (fp32 logits, statistics and accumulators inside): output and gradients in bf16, within bf16
  rounding of the fp32 reference."""
  q, k, v, c = qkv(1, 90, 70, 2, 72, seed=11)
  bf = lambda *a: [jnp.asarray(x, jnp.bfloat16) for x in a]
  out, grads = fwd_and_grads(lambda q, k, v: blockwise_local(q, k, v, block_q=32, block_kv=16), *bf(q, k, v, c))
  want, want_grads = fwd_and_grads(lambda q, k, v: dot_product_attention(q, k, v), q, k, v, c)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert rel(out.astype(jnp.float32), want) <= 2e-2
  for g, w in zip(grads, want_grads):
    assert rel(g.astype(jnp.float32), w) <= 3e-2
