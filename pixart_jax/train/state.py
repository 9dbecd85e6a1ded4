"""The train state: parameters, optimizer state, EMA, step and RNG as one pytree, created already sharded.

Parameters are the `nnx.Param` variables of the model as an `nnx.State` (a pytree whose leaves are arrays and
whose Variables keep their logical axis names). Everything derived from them (optimizer moments, CAME's factored
statistics, the EMA) keeps those names, so one call to `parallel.sharding.state_shardings` gives the sharding of
every leaf; the step, the RNG and optimizer counters are replicated.

Creation follows shapes -> shardings -> `jax.jit(init, out_shardings=...)` (nothing is ever materialised whole on
one device):

  spec = models.spec.ModelSpec(cfg, dtype=jnp.bfloat16)  # static: graphdef + abstract parameters
  abstract = jax.eval_shape(partial(init_state, spec=spec, tx=tx, ema=True), key)
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(partial(init_state, ...), out_shardings=shardings)(key)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel import sharding as sharding_lib
from pixart_jax.train.ema import ema_init


@dataclasses.dataclass(frozen=True)
class TrainState:
  """step: int32 () updates done. params: nnx.State of the model's Params (param dtype, fp32).
  opt_state: the optax state. ema: float32 copy of params updated each step, or None.
  rng: uint32 (2,) raw key; the key of step s is fold_in(rng, s)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
  rng: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state", "ema", "rng"],
                                 meta_fields=[])


def split_key(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, train rng) from the config seed; raw uint32 keys (checkpointable, partitionable threefry)."""
  init_key, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, train_rng


def init_state(init_key: jax.Array, train_rng: jax.Array, *, spec: ModelSpec, tx: optax.GradientTransformation,
               ema: bool) -> TrainState:
  """A fresh state (pure: jit it with out_shardings)."""
  model = spec.build(nnx.Rngs(params=init_key))
  _, params = nnx.split(model, nnx.Param)
  return state_from_params(params, train_rng, tx=tx, ema=ema)


def state_from_params(params: Any, train_rng: jax.Array, *, tx: optax.GradientTransformation,
                      ema: bool) -> TrainState:
  """Step-0 state around given parameters (init_from): fresh optimizer state, EMA = params."""
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                    ema=ema_init(params) if ema else None, rng=jnp.asarray(train_rng, jnp.uint32))


def shardings_of(abstract: TrainState, mesh: jax.sharding.Mesh, rules=sharding_lib.LOGICAL_RULES) -> TrainState:
  """NamedSharding per leaf: Variables by their logical names, everything else replicated."""
  return sharding_lib.state_shardings(abstract, mesh, rules)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (the restore target on the CURRENT mesh); Variables are kept.

  `shardings` is the tree of `shardings_of` (a NamedSharding where `abstract` has a Variable or a leaf).
  """

  def one(s, a):
    if isinstance(a, nnx.Variable):
      v = a.get_value()
      return a.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

  return jax.tree.map(one, shardings, abstract)


def parameter_overview(params: Any) -> str:
  """A table of parameter groups (an nnx.State or a nested dict): count, shapes and shardings (logged at startup)."""
  rows, total = [], 0
  for path, v in nnx.to_flat_state(params if isinstance(params, nnx.State) else nnx.State(params)):
    arr = v.get_value() if isinstance(v, nnx.Variable) else v
    n = int(np.prod(arr.shape))
    total += n
    spec = getattr(getattr(arr, "sharding", None), "spec", "")
    rows.append(f"  {'.'.join(map(str, path)):60s} {str(tuple(arr.shape)):20s} {n:>12,d}  {spec}")
  return "\n".join([f"parameters: {total:,d} in {len(rows)} arrays"] + rows)


def global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares) over all leaves, float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
