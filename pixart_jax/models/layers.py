"""Small building blocks shared by the DiT: dense factory, parameter-free LayerNorm, modulation, MLP.

Axis legend: B batch, L image tokens, S caption tokens, D hidden width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.parallel.sharding import param_init

Dtype = jnp.dtype


def xavier_uniform():
  return nnx.initializers.xavier_uniform()


def dot_accumulate_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general` that accumulates in float32 and returns the operands' dtype.

  For float32 operands this is the plain dot. For bf16 / fp16 it states what TPUs and GPUs do anyway (MXU / tensor
  cores accumulate in fp32; the convert fuses into the dot), and it lets XLA's CPU backend run the dot natively
  (YNNPACK on AMX / avx512_bf16) instead of rewriting a bf16-output dot into an fp32 one on converted operands
  (measured: the XL/2 forward in bf16 ran no faster than fp32 before this, bench/results/cpu.md).
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
  y = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32,
                          **kwargs)
  return y.astype(out_dtype)


def dense(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    kernel_init=None,
    zero: bool = False,
) -> nnx.Linear:
  """nnx.Linear with bias whose kernel (in, out) and bias (out,) carry logical axis names."""
  if zero:
    kernel_init = nnx.initializers.zeros_init()
  kernel_init = kernel_init or xavier_uniform()
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=param_init(kernel_init, names),
      bias_init=param_init(nnx.initializers.zeros_init(), (names[1],)),
      dot_general=dot_accumulate_f32,
      rngs=rngs,
  )


def layer_norm(x: jax.Array, eps: float, scale: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
  """LayerNorm over the last axis with fp32 statistics; optional affine. Returns x's dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift (t2i_modulate); shift/scale broadcast over tokens."""
  return x * (1 + scale) + shift


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class Mlp(nnx.Module):
  """fc1 -> GELU(tanh) -> fc2 (timm Mlp / diffusers FeedForward with gelu-approximate)."""

  def __init__(self, dim: int, hidden: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
               names=("embed", "mlp"), out_dim: int | None = None, out_name: str | None = None, kernel_init=None):
    """names = (input axis, hidden axis); the output axis is `out_name` (default: the input axis)."""
    out_dim = out_dim or dim
    self.fc1 = dense(dim, hidden, names, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=kernel_init)
    self.fc2 = dense(hidden, out_dim, (names[1], out_name or names[0]), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs, kernel_init=kernel_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., dim) -> (..., out_dim)."""
    return self.fc2(gelu_tanh(self.fc1(x)))
