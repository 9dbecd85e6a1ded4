"""Exponential moving average of the parameters (float32), as a pure function over parameter pytrees.

ema <- rate * ema + (1 - rate) * params, leaf by leaf, in float32 (the official `update_ema` with `ema_rate`,
docs/ARCHITECTURE.md §5.5). The official Sigma training script keeps no EMA; here it is optional (`config.ema.rate`, None = off).
The EMA tree has the structure (and, in the train state, the shardings) of the parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_init(params: Any) -> Any:
  """The EMA at step 0: a float32 copy of the parameters."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_update(ema: Any, params: Any, rate: float | jax.Array) -> Any:
  """rate * ema + (1 - rate) * params (float32). `rate` in [0, 1]; 0 copies the parameters."""
  if isinstance(rate, (int, float)) and not 0.0 <= rate <= 1.0:
    raise ValueError(f"EMA rate must lie in [0, 1], got {rate}")
  rate = jnp.asarray(rate, jnp.float32)
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p.astype(jnp.float32), ema, params)
