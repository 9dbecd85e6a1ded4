"""Sequence ("context") parallelism on 8 fake devices: the whole tiny DiT (one uncompressed and one KV-compressed
stage) gives the unsharded forward and parameter gradients on two aspect ratios and several meshes; the K/V
all-gather really carries compressed K/V (bytes read from the compiled HLO); bad grids get clear errors.

Errors are max |got - want| / max |want| (gradients: see tests/test_attention_backends.py; the same rule).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixart_jax.models.attention import SelfAttention
from pixart_jax.models.attention_backends import AttentionBackend, AttentionOptions, SplashBlockSizes
from pixart_jax.models.config import get_preset
from pixart_jax.models.spec import ModelSpec, abstract
from pixart_jax.parallel import context
from pixart_jax.parallel.mesh import make_mesh

TOL = 1e-5
# Layer 0 attends to all-gathered full K/V, layer 1 to all-gathered 2x2-compressed K/V.
CFG = get_preset("tiny", hidden_size=48, num_heads=4, depth=2, kv_compress_layers=(1,))
SPEC = ModelSpec(CFG, attention=AttentionOptions(sequence_parallel=True))
# latent (H, W) -> token grids 16x8, 8x24 and 15x10 (odd: 150 tokens and 15 rows split into 4 shards only padded)
LATENTS = {"tall-16x8": (32, 16), "wide-8x24": (16, 48), "odd-15x10": (30, 20)}
MESHES = {
    "seq4-data2": [("sequence", 4), ("data", 2)],
    "seq8": [("sequence", 8)],
    "seq2-tensor2-data2": [("sequence", 2), ("tensor", 2), ("data", 2)],  # heads split: KV-compress LN psum
}
_GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\S* all-gather\(.*op_name=\"([^\"]*)\"")


def rel(got, want) -> float:
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


def assert_grads_close(got, want, tol=TOL):
  """Flattened and leaf-by-leaf; leaves with an exactly-zero true gradient (key biases) against the largest."""
  gmax = max(float(np.abs(a).max()) for a in jax.tree.leaves(want))

  def one(a, b):
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max()) / (scale if scale > 1e-4 * gmax else gmax)

  worst = max(jax.tree.leaves(jax.tree.map(one, got, want)))
  assert worst <= tol, worst


def gathers(hlo: str) -> list[tuple[tuple[int, ...], int, str]]:
  """(shape, bytes, op_name) of every all-gather in compiled HLO text."""
  out = []
  for m in _GATHER.finditer(hlo):
    shape = tuple(int(s) for s in m.group(2).split(",") if s)
    out.append((shape, int(np.prod(shape)) * np.dtype(m.group(1).replace("f", "float")).itemsize, m.group(3)))
  return out


@functools.lru_cache(maxsize=None)
def _model():
  """Random parameters everywhere (no zero-initialised projections), built from the abstract model (fast)."""
  graphdef, state = nnx.split(abstract(SPEC))
  rng = np.random.default_rng(0)
  flat = nnx.to_flat_state(state)
  for path, v in flat:
    noise = 0.05 * rng.standard_normal(v.get_value().shape).astype(np.float32)
    v.set_value(noise + (1.0 if str(path[-1]).endswith("scale") else 0.0))
  return graphdef, nnx.from_flat_state(flat)


def _inputs(latent):
  rng = np.random.default_rng(sum(latent))
  hh, ww = latent
  x = rng.standard_normal((2, hh, ww, 4)).astype(np.float32)
  t = np.array([10.0, 700.0], np.float32)
  y = rng.standard_normal((2, 16, 32)).astype(np.float32)
  mask = (np.arange(16)[None] < np.array([[3], [16]])).astype(np.int32)
  c = rng.standard_normal((2, hh, ww, 8)).astype(np.float32)
  return x, t, y, mask, c


def _run(latent, mesh):
  """Forward output and d(sum(out * c))/d(params); with the compiled HLO text under a mesh."""
  graphdef, state = _model()
  x, t, y, mask, c = _inputs(latent)

  def loss(s):
    out = nnx.merge(graphdef, s)(x, t, y, mask)
    return jnp.sum(out * c), out

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    (_, out), grads = fn(state)
    return np.asarray(out), jax.tree.map(np.asarray, grads), ""
  with jax.set_mesh(mesh):
    compiled = fn.lower(state).compile()
    (_, out), grads = compiled(state)
  return np.asarray(out), jax.tree.map(np.asarray, grads), compiled.as_text()


@functools.lru_cache(maxsize=None)
def _reference(latent_name):
  return _run(LATENTS[latent_name], None)


@pytest.mark.parametrize("mesh_name,latent_name", [
    ("seq4-data2", "tall-16x8"), ("seq4-data2", "wide-8x24"), ("seq4-data2", "odd-15x10"),
    pytest.param("seq8", "tall-16x8", marks=pytest.mark.slow),
    pytest.param("seq2-tensor2-data2", "wide-8x24", marks=pytest.mark.slow)])
def test_dit_forward_and_grads_equal_unsharded(mesh_name, latent_name):
  want, g_want, _ = _reference(latent_name)
  mesh = make_mesh(MESHES[mesh_name])
  got, g_got, hlo = _run(LATENTS[latent_name], mesh)
  assert rel(got, want) <= TOL
  assert_grads_close(g_got, g_want)
  # The explicit path ran: two K/V all-gathers per stage, full L tokens (stage 0) and L/4 (stage 1, compressed);
  # an odd grid gathers its padded tokens (L rounded up to the shards) and padded rows of 2x2 windows.
  h, w = (n // 2 for n in LATENTS[latent_name])
  s = mesh.shape["sequence"]
  full, comp = -(-(h * w) // s) * s, context.padded_rows(h, s, 2) // 2 * (w // 2)
  shapes = sorted({g[0] for g in gathers(hlo) if context.GATHER_SCOPE in g[2]})
  b_loc = 2 // mesh.shape["data"]
  d_loc = CFG.hidden_size // mesh.shape["tensor"]
  assert shapes == sorted({(b_loc, full, d_loc), (b_loc, comp, d_loc)}), shapes


def _attn_hlo(kv_ratio: int, opts: AttentionOptions, mesh, hw=(16, 8)) -> str:
  attn = SelfAttention(48, 4, kv_ratio=kv_ratio, rngs=nnx.Rngs(0), opts=opts, dtype=jnp.float32,
                       param_dtype=jnp.float32)
  graphdef, state = nnx.split(attn)
  x = np.zeros((2, hw[0] * hw[1], 48), np.float32)
  with jax.set_mesh(mesh):
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, hw)).lower(state, x).compile().as_text()


def test_compressed_kv_all_gather_moves_4x_fewer_bytes():
  """Counted in the compiled HLO of the self-attention layer (sequence=4 x data=2, 16x8 tokens, batch 2)."""
  mesh = make_mesh(MESHES["seq4-data2"])
  sp = AttentionOptions(sequence_parallel=True)
  full, comp = (gathers(_attn_hlo(r, sp, mesh)) for r in (1, 2))
  for found in (full, comp):  # K and V, nothing else gathered (no silent all-gather of uncompressed K/V)
    assert len(found) == 2 and all(context.GATHER_SCOPE in g[2] for g in found), found
  bytes_full, bytes_comp = sum(g[1] for g in full), sum(g[1] for g in comp)
  assert bytes_full == 2 * 1 * 128 * 48 * 4  # K+V, 1 sample per device, all 128 tokens, fp32
  assert bytes_full == 4 * bytes_comp
  # With sequence_parallel off, the partitioner's own path is used (no explicit gathers).
  plain = gathers(_attn_hlo(2, AttentionOptions(), mesh))
  assert not any(context.GATHER_SCOPE in g[2] for g in plain)


@pytest.mark.parametrize("mode", ["conv", "ave", "uniform"])
@pytest.mark.parametrize("ratio,grid", [(2, (13, 6)), (2, (8, 24)), (3, (7, 5)), (1, (3, 5))])
def test_any_grid_splits_with_masked_padding(mode, ratio, grid):
  """Grids whose rows do not split into whole R x R windows per shard (13 or 7 rows; 8 rows over 8 shards at
  R = 2: one row each) or whose tokens do not divide (15 over 8): padded, masked, cut - the unsharded layer's
  output, for every KV-compression mode (conv / ave keep floor(h/R) window rows, uniform ceil(h/R))."""
  mesh = make_mesh(MESHES["seq8"])
  make = lambda opts: SelfAttention(48, 4, kv_ratio=ratio, kv_mode=mode, rngs=nnx.Rngs(0), opts=opts,  # noqa: E731
                                    dtype=jnp.float32, param_dtype=jnp.float32)
  graphdef, state = nnx.split(make(AttentionOptions()))
  sp_graph, _ = nnx.split(make(AttentionOptions(sequence_parallel=True)))
  if mode == "conv" and ratio > 1:  # a kernel that is not the average, so windows are told apart
    k = state["compress"]["kernel"]
    k.set_value(k.get_value() * np.random.default_rng(1).uniform(0.2, 2.0, k.get_value().shape).astype(np.float32))
  x = np.random.default_rng(ratio).standard_normal((2, grid[0] * grid[1], 48)).astype(np.float32)
  want = nnx.merge(graphdef, state)(x, grid)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda s, x: nnx.merge(sp_graph, s)(x, grid))(state, x)
  assert rel(got, want) <= TOL


def test_padded_rows_and_errors():
  assert [context.padded_rows(h, 4, 2) for h in (1, 8, 9, 15, 16)] == [8, 8, 16, 16, 16]
  assert context.padded_rows(135, 8, 2) == 144 and context.padded_rows(135, 4, 1) == 136
  with pytest.raises(ValueError, match="must be >= 1, got 0, 4, 2"):
    context.padded_rows(0, 4, 2)
  x = np.zeros((2, 8 * 24, 48), np.float32)
  with pytest.raises(ValueError, match="needs an enclosing mesh"):
    context.sequence_parallel_self_attention(x, x, x, (8, 24), num_heads=4,
                                             opts=AttentionOptions(sequence_parallel=True))


def test_sequence_parallel_with_splash():
  """SP + the splash kernel (interpret mode) per device, vs the unsharded xla layer: forward and gradients."""
  splash_sp = AttentionOptions(backend=AttentionBackend.SPLASH, min_seq=0, block_sizes=SplashBlockSizes(128, 128, 128),
                               sequence_parallel=True)

  def make(opts):
    attn = SelfAttention(32, 2, kv_ratio=2, rngs=nnx.Rngs(0), opts=opts, dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(1)
    for _, v in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
      v.set_value(v.get_value() + 0.2 * rng.standard_normal(v.get_value().shape).astype(np.float32))
    return nnx.split(attn)

  x = np.random.default_rng(2).standard_normal((2, 16 * 12, 32)).astype(np.float32)
  c = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)

  def run(opts, mesh=None):
    graphdef, state = make(opts)
    fn = jax.jit(jax.value_and_grad(lambda s, x: (lambda o: (jnp.sum(o * c), o))(nnx.merge(graphdef, s)(x, (16, 12))),
                                    argnums=(0, 1), has_aux=True))
    if mesh is None:
      return fn(state, x)
    with jax.set_mesh(mesh):
      assert "pallas_call" in str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, (16, 12)))(state))
      return fn(state, x)

  (_, want), (gp_want, gx_want) = run(AttentionOptions())
  (_, got), (gp_got, gx_got) = run(splash_sp, make_mesh(MESHES["seq4-data2"]))
  assert rel(got, want) <= 2e-6
  assert rel(gx_got, gx_want) <= 2e-6
  assert_grads_close(gp_got, gp_want, tol=2e-6)


def test_sequence_parallel_flag_plumbs_from_config():
  """config.model.attention.sequence_parallel -> ModelSpec.attention -> the self-attention of every stage."""
  from pixart_jax.train.loop import model_spec
  from train_testlib import smoke_config

  spec = model_spec(smoke_config(**{"model.attention.sequence_parallel": True,
                                    "model.overrides.kv_compress_layers": (1,)}).model)
  assert spec.attention.sequence_parallel and spec.attention == AttentionOptions(sequence_parallel=True)
  stages = abstract(spec).stages
  assert len(stages) == 2 and all(stage.attn.opts.sequence_parallel for stage in stages)
  assert not any(stage.attn.opts.sequence_parallel for stage in abstract(spec.replace(attention=None)).stages)
  assert not model_spec(smoke_config().model).attention.sequence_parallel
