"""Attention backends: splash (Pallas interpret mode on the CPU) and the threshold fallback agree with the xla
reference in fp32, forward and gradients, with caption masks, KV compression, padding and under a mesh; cudnn
is refused off-GPU with a clear error.

Errors are max |got - want| / max |want| per array. Parameter gradients are compared as one flattened vector
(max error over all leaves / largest gradient <= 2e-6) and, as a second guard, leaf by leaf at <= 1e-5: a bias
gradient is a sum over all tokens with heavy cancellation, where the kernel's backward (dS = P * (dP - rowsum(dO
* O))) is measurably noisier than XLA's in the last bits (k bias: 2.9e-6 vs 0.8e-6 against a float64 reference,
both far below the other leaves' scale). Leaves whose true gradient is exactly zero (key biases without qk-norm,
the key-norm bias: softmax is invariant to shifting every key by one vector) are pure rounding noise and are
measured against the largest gradient.
"""
import dataclasses
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixart_jax.models.attention import CrossAttention, SelfAttention
from pixart_jax.models.attention_backends import (AttentionBackend, AttentionOptions, SplashBlockSizes,
                                                  dot_product_attention, select_backend, splash_local)
from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.spec import ModelSpec, abstract
from pixart_jax.parallel.mesh import make_mesh

TOL = 2e-6
SPLASH = AttentionOptions(backend=AttentionBackend.SPLASH, min_seq=0, block_sizes=SplashBlockSizes(128, 128, 128))
XLA = AttentionOptions(backend=AttentionBackend.XLA)
KW = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def rel(got, want) -> float:
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


def assert_grads_close(got, want, tol=TOL, leaf_tol=1e-5):
  gmax = max(float(np.abs(a).max()) for a in jax.tree.leaves(want))
  diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got, want)
  assert max(jax.tree.leaves(diffs)) / gmax <= tol

  def one(a, b):
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max()) / (scale if scale > 1e-4 * gmax else gmax)

  worst = max(jax.tree.leaves(jax.tree.map(one, got, want)))
  assert worst <= leaf_tol, worst


def perturb(module, seed=0):
  """Non-zero everywhere (the output projections are zero-initialised)."""
  rng = np.random.default_rng(seed)
  for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    v.set_value(v.get_value() + 0.2 * rng.standard_normal(v.get_value().shape).astype(np.float32))
  return module


def count_primitive(module, name: str, *args) -> int:
  """How many `name` equations the traced call contains, sub-jaxprs (scan bodies, custom_vjp, shard_map)
  included; abstract (eval_shape) modules work."""
  graphdef, state = nnx.split(module)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*args))(state).jaxpr

  def subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
      yield value
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subjaxprs(v)

  def walk(j):
    n = 0
    for eqn in j.eqns:
      n += eqn.primitive.name == name
      if eqn.primitive.name != name:
        for value in eqn.params.values():
          n += sum(walk(sub) for sub in subjaxprs(value))
    return n

  return walk(jaxpr)


def fwd_and_grads(module, *args):
  """Output and d(sum(out * c))/d(params, first arg), jitted."""
  graphdef, state = nnx.split(module)
  c = np.random.default_rng(7).standard_normal(jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args), state).shape)

  def loss(s, x0):
    out = nnx.merge(graphdef, s)(x0, *args[1:])
    return jnp.sum(out * c), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, args[0])
  return out, grads


def test_names_options_and_block_sizes():
  assert AttentionBackend.parse("Splash") is AttentionBackend.SPLASH
  with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
    AttentionBackend.parse("flash")
  with pytest.raises(ValueError, match="unknown attention backend"):
    AttentionOptions(backend="flash")
  with pytest.raises(ValueError, match="unknown attention backend"):
    ModelSpec(get_preset("tiny"), attention="flash")
  with pytest.raises(ValueError, match="multiple of 128"):
    AttentionOptions(block_sizes=(512, 100, 100))
  with pytest.raises(ValueError, match="not a multiple of block_kv_compute"):
    SplashBlockSizes(128, 384, 256)
  with pytest.raises(ValueError, match=r"\(block_q, block_kv, block_kv_compute\)"):
    AttentionOptions(block_sizes=(512, 512))
  with pytest.raises(ValueError, match="min_seq must be an int >= 0"):
    AttentionOptions(min_seq=-1)
  with pytest.raises(ValueError, match=r"unknown attention options \['blocks'\]"):
    AttentionOptions.parse({"backend": "splash", "blocks": (128, 128, 128)})
  # The experiment config's block (a JSON round trip gives lists; None keeps a default) and a bare backend name.
  opts = AttentionOptions.parse(json.loads(json.dumps(dict(backend="splash", block_sizes=[256, 1024, 512],
                                                           min_seq=1024, interpret=None))))
  assert opts == AttentionOptions(backend=AttentionBackend.SPLASH, block_sizes=SplashBlockSizes(256, 1024, 512))
  assert hash(opts) == hash(AttentionOptions("splash", block_sizes=(256, 1024, 512)))
  assert AttentionOptions.parse("splash") == AttentionOptions(backend=AttentionBackend.SPLASH)
  assert AttentionOptions.parse(None) == AttentionOptions() and AttentionOptions.parse(opts) is opts
  assert opts.backend is AttentionBackend.SPLASH and opts.block_sizes == SplashBlockSizes(256, 1024, 512)
  assert select_backend(opts, 1023) is AttentionBackend.XLA and select_backend(opts, 1024) is AttentionBackend.SPLASH


def test_splash_kernel_head_dim_72_padding_and_masks():
  """XL/2's head dim 72 (padded to 128), 200 queries and 77 keys (padded to block multiples), per-sample key
  masks of different lengths: forward and d/d(q, k, v)."""
  rng = np.random.default_rng(0)
  b, l, m, n, kd = 2, 200, 77, 2, 72
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, l, n, kd), (b, m, n, kd), (b, m, n, kd)))
  mask = jnp.arange(m)[None] < jnp.array([[5], [77]])
  c = rng.standard_normal((b, l, n, kd))
  blocks = SplashBlockSizes(128, 128, 128)

  def run(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * c), argnums=(0, 1, 2)))(q, k, v)

  (_, g_splash) = run(lambda *a: splash_local(*a, mask, block_sizes=blocks))
  (_, g_xla) = run(lambda *a: dot_product_attention(*a, mask))
  o_splash = jax.jit(lambda *a: splash_local(*a, mask, block_sizes=blocks))(q, k, v)
  o_xla = dot_product_attention(q, k, v, mask)
  assert o_splash.shape == o_xla.shape
  assert rel(o_splash, o_xla) <= TOL
  for gs, gx in zip(g_splash, g_xla):
    assert rel(gs, gx) <= TOL
  # The mask matters: sample 0 sees 5 keys only.
  assert rel(o_xla, dot_product_attention(q, k, v)) > 1e-2


@pytest.mark.parametrize("kv_ratio,qk_norm", [(1, True), (2, False)], ids=["plain-qknorm", "kv2"])
def test_self_attention_splash_matches_xla(kv_ratio, qk_norm):
  """Whole module (projections, qk-norm / conv KV compression, 140 tokens on a 10x14 grid): forward and
  gradients w.r.t. every parameter and the input."""
  mk = lambda opts: perturb(SelfAttention(32, 2, kv_ratio=kv_ratio, qk_norm=qk_norm, rngs=nnx.Rngs(0), opts=opts,
                                          **KW))
  ref, ours = mk(XLA), mk(SPLASH)
  x = np.random.default_rng(1).standard_normal((2, 140, 32)).astype(np.float32)
  assert count_primitive(ours, "pallas_call", x, (10, 14)) == 1
  assert count_primitive(ref, "pallas_call", x, (10, 14)) == 0
  o_ref, (gp_ref, gx_ref) = fwd_and_grads(ref, x, (10, 14))
  o, (gp, gx) = fwd_and_grads(ours, x, (10, 14))
  assert rel(o, o_ref) <= TOL
  assert rel(gx, gx_ref) <= TOL
  assert_grads_close(gp, gp_ref)


def test_cross_attention_splash_caption_masks():
  """Different caption lengths per sample (1 and 11 of 16 tokens) via segment ids."""
  mk = lambda opts: perturb(CrossAttention(32, 2, rngs=nnx.Rngs(0), opts=opts, **KW))
  ref, ours = mk(XLA), mk(SPLASH)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 96, 32)).astype(np.float32)
  y = rng.standard_normal((2, 16, 32)).astype(np.float32)
  mask = np.arange(16)[None] < np.array([[1], [11]])
  o_ref, (gp_ref, gx_ref) = fwd_and_grads(ref, x, y, mask)
  o, (gp, gx) = fwd_and_grads(ours, x, y, mask)
  assert rel(o, o_ref) <= TOL
  assert rel(gx, gx_ref) <= TOL
  assert_grads_close(gp, gp_ref)
  o_nomask, _ = fwd_and_grads(ref, x, y, np.ones_like(mask))
  assert rel(o_nomask, o_ref) > 1e-2  # the masks are really exercised


def test_threshold_falls_back_to_xla():
  """min_seq counts key/value tokens: 140 uncompressed keys run splash, the 35 compressed ones fall back."""
  opts = dataclasses.replace(SPLASH, min_seq=64)
  x = np.zeros((1, 140, 32), np.float32)
  plain = SelfAttention(32, 2, rngs=nnx.Rngs(0), opts=opts, **KW)
  comp = SelfAttention(32, 2, kv_ratio=2, rngs=nnx.Rngs(0), opts=opts, **KW)
  assert count_primitive(plain, "pallas_call", x, (10, 14)) == 1
  assert count_primitive(comp, "pallas_call", x, (10, 14)) == 0
  ref = SelfAttention(32, 2, kv_ratio=2, rngs=nnx.Rngs(0), opts=XLA, **KW)
  xr = np.random.default_rng(3).standard_normal((1, 140, 32)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(comp(xr, (10, 14))), np.asarray(ref(xr, (10, 14))))


def test_cudnn_refused_off_gpu_and_threshold_applies():
  assert jax.default_backend() == "cpu"
  opts = AttentionOptions(backend=AttentionBackend.CUDNN, min_seq=64)
  x = np.ones((1, 140, 32), np.float32)
  attn = SelfAttention(32, 2, rngs=nnx.Rngs(0), opts=opts, **KW)
  with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
    attn(x, (10, 14))
  short = SelfAttention(32, 2, kv_ratio=2, rngs=nnx.Rngs(0), opts=opts, **KW)  # 35 keys < 64: xla, no error
  assert short(x, (10, 14)).shape == x.shape


def test_splash_inside_shard_map_under_mesh():
  """Under jax.set_mesh the kernel runs per device inside jax.shard_map (batch over data, heads over tensor,
  queries over sequence) and still equals the unsharded xla reference."""
  mesh = make_mesh([("data", 2), ("tensor", 2), ("sequence", 2)])
  mk = lambda opts: perturb(CrossAttention(32, 2, rngs=nnx.Rngs(0), opts=opts, **KW))
  ref, ours = mk(XLA), mk(SPLASH)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 96, 32)).astype(np.float32)
  y = rng.standard_normal((2, 16, 32)).astype(np.float32)
  mask = np.arange(16)[None] < np.array([[4], [16]])
  o_ref, (gp_ref, gx_ref) = fwd_and_grads(ref, x, y, mask)
  with jax.set_mesh(mesh):
    n_shard_map = count_primitive(ours, "shard_map", x, y, mask)
    n_kernel = count_primitive(ours, "pallas_call", x, y, mask)
    o, (gp, gx) = fwd_and_grads(ours, x, y, mask)
  assert n_shard_map == 1 and n_kernel == 1
  assert rel(o, o_ref) <= TOL
  assert rel(gx, gx_ref) <= TOL
  assert_grads_close(gp, gp_ref)


def test_model_spec_routes_backend():
  """ModelSpec.attention (from the experiment's config.model.attention) reaches every attention layer: splash in
  self- and cross-attention of each stage."""
  from pixart_jax.train.loop import model_spec
  from train_testlib import smoke_config

  args = (np.zeros((1, 8, 8, 4), np.float32), np.ones((1,), np.float32), np.zeros((1, 16, 32), np.float32),
          np.ones((1, 16), np.int32))
  spec = model_spec(smoke_config(**{"model.attention.backend": "splash", "model.attention.min_seq": 0}).model)
  assert spec.attention == AttentionOptions(backend=AttentionBackend.SPLASH, min_seq=0)
  assert count_primitive(abstract(spec), "pallas_call", *args) == 2  # one scanned stage: self + cross
  kv = spec.replace(cfg=spec.cfg.replace(kv_compress_layers=(1,)))
  assert count_primitive(abstract(kv), "pallas_call", *args) == 4
  assert count_primitive(abstract(spec.replace(attention="xla")), "pallas_call", *args) == 0
  assert model_spec(smoke_config().model).attention == AttentionOptions()  # the default block: auto
  assert AttentionOptions().backend is AttentionBackend.AUTO


@pytest.mark.slow
def test_dit_forward_splash_matches_xla():
  cfg = get_preset("tiny", kv_compress_layers=(1,))
  ref = perturb(PixArtSigma(cfg, attention=XLA, rngs=nnx.Rngs(0)))
  ours = perturb(PixArtSigma(cfg, attention=SPLASH, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 16, 12, 4)).astype(np.float32)
  t = np.array([3.0, 800.0], np.float32)
  y = rng.standard_normal((2, 16, 32)).astype(np.float32)
  mask = (np.arange(16)[None] < np.array([[2], [16]])).astype(np.int32)
  fwd = nnx.jit(lambda m, *a: m(*a))
  assert rel(fwd(ours, x, t, y, mask), fwd(ref, x, t, y, mask)) <= TOL
