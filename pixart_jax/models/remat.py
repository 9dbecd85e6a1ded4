"""Remat (gradient checkpointing) policies by name, parsed once at the edge."""
from __future__ import annotations

import jax

from pixart_jax.enums import ParsedEnum


class RematPolicy(ParsedEnum, what="remat policy"):
  NONE = "none"                  # keep every activation
  FULL = "full"                  # recompute everything in the backward pass (save only block inputs)
  DOTS = "dots"                  # save matmul outputs
  DOTS_NO_BATCH = "dots_no_batch"  # save matmuls without batch dims (weights-side products)

  def wrap(self, fn):
    """Wraps a scan body with jax.checkpoint under this policy (identity for NONE)."""
    if self is RematPolicy.NONE:
      return fn
    policy = {
        RematPolicy.FULL: None,
        RematPolicy.DOTS: jax.checkpoint_policies.checkpoint_dots,
        RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[self]
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)
