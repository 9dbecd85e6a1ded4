"""Logical axis names -> mesh axes, in one table.

Every parameter carries logical axis names (stored by `flax.nnx.with_partitioning` as the
`out_sharding` metadata of the Variable); key activations are constrained with `constrain`.
`LOGICAL_RULES` maps those names onto the mesh axes `data`, `fsdp`, `tensor`, `sequence`.
A config may override the table; nothing here reads flags or global config.

Logical names used in this package:
  batch        examples                         activation_length  image tokens
  embed        model width (DiT, T5 d_model)    caption            caption tokens (300)
  heads        fused heads*head_dim outputs     mlp                MLP hidden
  kv           per-head width                   layers             scanned layer axis
  vocab        T5 vocabulary                    caption_embed      T5 width fed to the DiT
  conv_in      conv input channels              conv_out           conv output channels
  norm         norm scale/bias vectors          table              modulation table rows
  activation_embed / activation_heads: the width / heads axes of activations (not parameters)
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("caption", None),
    ("embed", "fsdp"),
    ("caption_embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
    ("table", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
)


def param_init(initializer, names: tuple[str | None, ...]):
  """Wraps an initializer so the Param carries logical axis `names` (no eager sharding)."""
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


def make_param(initializer, key, shape, dtype, names: tuple[str | None, ...]) -> nnx.Param:
  """A Param created by `initializer(key, shape, dtype)` carrying logical axis `names`."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} logical names {names} for a parameter of shape {shape}")
  return nnx.Param(initializer(key, shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_RULES,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec (first dimension wins). With `shape` and `mesh`,
  mesh axes that do not divide the dimension, or have size 1, are dropped for that dimension,
  so tiny test models shard whatever they can and replicate the rest.
  """
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = [a for a in _as_tuple(table.get(name)) if a not in used] if name else []
    if mesh is not None:
      axes = [a for a in axes if a in mesh.shape and mesh.shape[a] > 1]
    if shape is not None and mesh is not None:
      kept, prod = [], 1
      for a in axes:
        if shape[i] % (prod * mesh.shape[a]) == 0:
          kept.append(a)
          prod *= mesh.shape[a]
      axes = kept
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


def _var_names(v: nnx.Variable):
  meta = v.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names")


def state_shardings(state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
  """NamedSharding for every leaf of an (abstract) nnx State, from its logical names."""

  def one(v):
    if isinstance(v, nnx.Variable):
      shape = v.get_value().shape
      return NamedSharding(mesh, logical_to_spec(_var_names(v), shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
  """Shardings of the whole model's state (same structure as `nnx.state(model)`)."""
  return state_shardings(nnx.state(model), mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
  """Moves every variable of `model` to its sharding on `mesh` (in place); returns the model."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names.

  Uses the mesh of the enclosing `jax.set_mesh` and the rules of the enclosing
  `nnx.logical_axis_rules` (or the default table). Outside a mesh it is the identity.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  rules = spmd.get_logical_axis_rules() or LOGICAL_RULES
  spec = logical_to_spec(names, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
