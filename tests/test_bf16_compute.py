"""The bf16 compute path: every DiT / T5 matmul multiplies bf16 operands and accumulates in fp32.

XLA's CPU backend rewrites a bf16-output dot into an fp32 dot over converted operands (no faster than fp32);
`models.layers.dot_accumulate_f32` asks for the fp32 result explicitly, which XLA runs as a native bf16 dot
(YNNPACK on AMX / avx512_bf16 CPUs) and TPUs / GPUs run as they always do. These tests pin both halves: the
numbers (bf16 operands, fp32 accumulation, rounded once) and the compiled program (bf16 dot operands).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixart_jax.models.layers import dense, dot_accumulate_f32


def _dot_operand_types(fn, *args) -> list[str]:
  """Element types of every dot's operands in the optimized HLO (fusion parameters resolved by name)."""
  txt = jax.jit(fn).lower(*args).compile().as_text()
  types = dict(re.findall(r"%(\S+) = (\w+)\[", txt))
  out = []
  for lhs, rhs in re.findall(r"= \w+\[[^\]]*\]\{[^}]*\} dot\(%([^,\s]+), %([^)\s]+)\)", txt):
    out += [types.get(lhs, "?"), types.get(rhs, "?")]
  return out


def test_dot_accumulate_f32_matches_fp32_accumulation_of_bf16_operands():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((37, 300)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((300, 65)), jnp.bfloat16)
  out = dot_accumulate_f32(a, b, (((1,), (0,)), ((), ())))
  assert out.dtype == jnp.bfloat16
  ref = (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(ref).astype(jnp.bfloat16)))
  # fp32 operands: the plain fp32 dot
  af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(dot_accumulate_f32(af, bf, (((1,), (0,)), ((), ())))),
                                np.asarray(jax.lax.dot_general(af, bf, (((1,), (0,)), ((), ())))))


def test_bf16_dense_compiles_to_a_bf16_dot():
  layer = dense(256, 128, ("embed", "mlp"), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  g, st = nnx.split(layer)
  x = jnp.ones((4, 256), jnp.bfloat16)
  types = _dot_operand_types(lambda s, x: nnx.merge(g, s)(x), st, x)
  assert types and all(t == "bf16" for t in types), types


def test_bf16_t5_attention_and_mlp_compile_to_bf16_dots():
  from pixart_jax.models.t5 import T5Config, T5Encoder

  cfg = T5Config.tiny(d_model=64, d_kv=16, num_heads=4)
  enc = T5Encoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  g, st = nnx.split(enc)
  ids = jnp.ones((1, 8), jnp.int32)
  types = _dot_operand_types(lambda s, i: nnx.merge(g, s)(i, jnp.ones_like(i)), st, ids)
  assert types and types.count("bf16") == len(types), types
