"""Logical axis names -> mesh axes, in one table.

Every parameter carries logical axis names (stored by `flax.nnx.with_partitioning` as the
`out_sharding` metadata of the Variable); key activations are constrained with `constrain`.
`LOGICAL_RULES` maps those names onto the mesh axes `data`, `fsdp`, `tensor`, `sequence`.
A config may override the table; nothing here reads flags or global config. The batch of every input (data
pipeline, encoders, the Pipeline, the planner, code inside `shard_map`) is placed by `batch_sharding` /
`batch_spec`: its leading axis over the `batch` rule's mesh axes.

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

import math
from typing import Any, Sequence

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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


def active_rules() -> Rules:
  """The rules of the enclosing `nnx.logical_axis_rules`, else `LOGICAL_RULES` (for code inside the model)."""
  return spmd.get_logical_axis_rules() or LOGICAL_RULES


def _shard_axes(mesh, axes: Sequence[str], size: int | None = None) -> tuple[str, ...]:
  """The mesh axes among `axes` (in order) that shard a dimension: in the mesh, larger than 1, not manual (an
  enclosing `shard_map` already splits them) and, given the dimension's `size`, whose running product divides it."""
  types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
  kept, prod = [], 1
  for a in axes:
    if a not in mesh.shape or mesh.shape[a] <= 1 or types.get(a) == AxisType.Manual:
      continue
    if size is not None and size % (prod * mesh.shape[a]):
      continue
    kept.append(a)
    prod *= mesh.shape[a]
  return tuple(kept)


def _entry(axes: Sequence[str]):
  """A PartitionSpec entry: None, one axis name, or a tuple of them."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def dim_spec(mesh, axes: Sequence[str], size: int | None = None):
  """The PartitionSpec entry of one dimension of `size` over the mesh `axes` that can shard it (see `batch_spec`)."""
  return _entry(_shard_axes(mesh, axes, size))


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_RULES,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec (first dimension wins). With `mesh`, mesh axes of size 1 (or manual
  ones, inside `shard_map`) are dropped, and with `shape` too those that do not divide the dimension, so tiny test
  models shard whatever they can and replicate the rest.
  """
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = [a for a in _as_tuple(table.get(name)) if a not in used] if name else []
    if mesh is not None:
      axes = _shard_axes(mesh, axes, None if shape is None else shape[i])
    used.update(axes)
    out.append(_entry(axes))
  return PartitionSpec(*out)


def batch_axes(mesh, rules: Rules | None = None, size: int | None = None) -> tuple[str, ...]:
  """The mesh axes of the logical `batch` axis under `rules` (None: `active_rules()`) that shard a batch (of `size`
  examples, when given: then only those whose running product divides it)."""
  table = dict(active_rules() if rules is None else rules)
  return _shard_axes(mesh, _as_tuple(table.get("batch")), size)


def batch_spec(mesh, rules: Rules | None, ndim_or_shape: int | Sequence[int]) -> PartitionSpec:
  """The PartitionSpec of a batch-major array: the leading axis over `batch_axes`, the others replicated.

  ndim_or_shape: the array's rank (every batch axis of the mesh; the caller guarantees divisibility) or its shape
  (only the axes whose running product divides shape[0]: a batch that does not split evenly is replicated over the
  rest). Works on an abstract mesh inside `shard_map` (manual axes are left out) with rules None.
  """
  ndim = ndim_or_shape if isinstance(ndim_or_shape, int) else len(ndim_or_shape)
  if ndim < 1:
    raise ValueError(f"a batch-major array has rank >= 1, got {ndim_or_shape!r}")
  size = None if isinstance(ndim_or_shape, int) else int(ndim_or_shape[0])
  return PartitionSpec(_entry(batch_axes(mesh, rules, size)), *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, rules: Rules | None, ndim_or_shape: int | Sequence[int]) -> NamedSharding:
  """NamedSharding of a batch-major array on `mesh` (see `batch_spec`)."""
  return NamedSharding(mesh, batch_spec(mesh, rules, ndim_or_shape))


def batch_shards(mesh, rules: Rules | None = None) -> int:
  """How many ways `batch_sharding(mesh, rules, ndim)` splits the batch (a global batch must be a multiple)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


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
  spec = logical_to_spec(names, x.shape, mesh, active_rules())
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
