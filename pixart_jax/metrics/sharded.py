"""Run a metric network on a mesh: the batch split over the mesh's batch axes, parameters placed by the rules.

    features = ShardedApply(inception, lambda net, x: net(x), mesh)          # B H W 3 -> B 2048 (numpy)
    embeds = ShardedApply(clip, lambda m, ids, mask: m.text_features(ids, mask), mesh)

The model's variables are moved once to their shardings from their logical axis names (`rules`: the package
table by default, which replicates the Inception and shards CLIP's `embed`/`heads`/`mlp` axes over fsdp/tensor
when those mesh axes are > 1; `rules=()` replicates everything). Every call places each batch argument with its
leading axis over the `batch` rule's mesh axes (the rows are padded by repeating the last one to a multiple of
the number of batch shards; the padding is dropped from the result), runs one jitted program per input shape
under `jax.set_mesh`, and returns the result on the host (gathered from all processes on a multi-host mesh).
Without a mesh it is a plain jitted call.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from pixart_jax.parallel.sharding import LOGICAL_RULES, Rules, batch_shards, batch_sharding, shard_model

__all__ = ["ShardedApply", "to_host"]


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host sharded) array as one numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class ShardedApply:
  """`fn(model, *batch_args)` jitted on `mesh` with the batch sharded; returns numpy (see the module doc)."""

  def __init__(self, model: nnx.Module, fn: Callable[..., Any], mesh: jax.sharding.Mesh | None = None,
               rules: Rules = LOGICAL_RULES):
    self.mesh, self.rules = mesh, rules
    if mesh is not None:
      shard_model(model, mesh, rules)
    self._graphdef, self._state = nnx.split(model)
    graphdef = self._graphdef
    self._jit = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))

  @property
  def batch_shards(self) -> int:
    """Number of pieces the batch is split into (1 without a mesh)."""
    return 1 if self.mesh is None else batch_shards(self.mesh, self.rules)

  def batch_sharding(self) -> NamedSharding | None:
    """Leading axis over the `batch` rule's mesh axes (those of size > 1), the rest replicated."""
    return None if self.mesh is None else batch_sharding(self.mesh, self.rules, 1)

  def place(self, *args) -> list[jax.Array]:
    """The batch arguments padded to a multiple of `batch_shards` and put on their batch sharding (numpy
    inputs go through the host; jax.Array inputs are resharded on device)."""
    sizes = {np.shape(a)[0] for a in args}
    if len(sizes) != 1:
      raise ValueError(f"batch arguments have different leading sizes {sorted(sizes)}")
    extra = (-sizes.pop()) % self.batch_shards
    out = []
    for a in args:
      xp = jnp if isinstance(a, jax.Array) else np
      a = a if isinstance(a, jax.Array) else np.asarray(a)
      if extra:
        a = xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)], axis=0)
      out.append(jax.device_put(a, self.batch_sharding()) if self.mesh is not None else jnp.asarray(a))
    return out

  def __call__(self, *args) -> Any:
    """Batch arguments (leading axis B, numpy or host-readable arrays) -> the result's leaves cut to B rows."""
    b = np.shape(args[0])[0]
    placed = self.place(*args)
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      out = self._jit(self._state, *placed)
    return jax.tree.map(lambda x: to_host(x)[:b], out)
