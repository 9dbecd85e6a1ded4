"""Shared pieces of the samplers: input checks, the model call, the scan driver, noise.

Every sampler precomputes its per-step timesteps and coefficients in float64 numpy, casts them
once to float32 arrays, and runs the whole loop as one `jax.lax.scan` (one traced model call, one
compiled loop). The state is float32 whatever the model dtype.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def check_latents(x_T: jnp.ndarray) -> jnp.ndarray:
  """x_T (B, H, W, C) -> float32."""
  if getattr(x_T, "ndim", None) != 4:
    raise ValueError(
        f"x_T must be NHWC latents (B, H, W, C), got shape {getattr(x_T, 'shape', None)}")
  return jnp.asarray(x_T, jnp.float32)


def check_steps(num_steps: int, maximum: int | None = None) -> int:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  if maximum is not None and num_steps > maximum:
    raise ValueError(f"num_steps={num_steps} exceeds the {maximum} training timesteps")
  return int(num_steps)


def f32(a: np.ndarray) -> jnp.ndarray:
  """A float64 numpy table -> float32 jnp array (the one cast)."""
  return jnp.asarray(np.asarray(a, np.float64), jnp.float32)


def call_model(model_fn: ModelFn, x: jnp.ndarray, t: jnp.ndarray,
               channels: int | None) -> jnp.ndarray:
  """model_fn(x, t broadcast to (B,)) in float32; keeps the first `channels` (None: all)."""
  t_b = jnp.broadcast_to(t.astype(jnp.float32), (x.shape[0],))
  out = model_fn(x, t_b)
  if out.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        f"model output {out.shape} does not match the latents {x.shape} (expected (B, H, W, C_out))"
    )
  if channels is not None:
    if out.shape[-1] < channels:
      raise ValueError(f"model output has {out.shape[-1]} channels, need at least {channels}")
    out = out[..., :channels]
  return out.astype(jnp.float32)


def run_scan(step: Callable[[Any, Any], Any], carry: Any, xs: Any, x_T: jnp.ndarray,
             return_trajectory: bool):
  """Runs `carry = step(carry, xs[i])` over the steps; carry[0] is the state x.

  Returns x_final, or (x_final, trajectory (S+1, B, H, W, C)) with trajectory[0] = x_T.
  """
  def body(c, xs_i):
    c = step(c, xs_i)
    return c, (c[0] if return_trajectory else None)

  carry, ys = jax.lax.scan(body, carry, xs)
  if not return_trajectory:
    return carry[0]
  return carry[0], jnp.concatenate([x_T[None], ys], axis=0)


def noise_source(key: jax.Array | None, noise: jnp.ndarray | None, num_steps: int,
                 shape: tuple[int, ...], sampler: str):
  """Per-step noise for stochastic samplers, as scan inputs plus a function that draws step i's.

  `noise` (S, B, H, W, C) is used as given (parity tests); otherwise `key` is split per step.
  """
  if noise is not None:
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != (num_steps,) + tuple(shape):
      raise ValueError(
          f"{sampler}: noise must have shape {(num_steps,) + tuple(shape)}, got {noise.shape}")
    return noise, lambda n: n
  if key is None:
    raise ValueError(f"{sampler} is stochastic: pass key= (a jax.random key) or noise=")
  keys = jax.random.split(key, num_steps)
  return keys, lambda k: jax.random.normal(k, shape, jnp.float32)
