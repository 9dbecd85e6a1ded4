"""The model spec: an architecture (`DiTConfig`) and how it runs (dtypes, remat, scan, attention), built one way.

    spec = ModelSpec(get_preset("sigma-xl2-1024-ms"), dtype=jnp.bfloat16, attention="splash")
    model = spec.build(nnx.Rngs(0))       # random init
    shapes = abstract(spec)               # ShapeDtypeStruct leaves, nothing allocated (loading, sharding, planning)
    graphdef, params = spec.split()       # what the train step merges parameters into

Every place that needs the model without weights (the loaders, the trainer, the planner) goes through `abstract`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.remat import RematPolicy


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """cfg: the architecture. dtype / param_dtype: compute / storage dtype. remat: policy name (`RematPolicy`).
  scan: scanned blocks. attention: `AttentionOptions` (a backend name or a mapping of its fields is parsed)."""
  cfg: DiTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = True
  attention: AttentionOptions = AttentionOptions()

  def __post_init__(self):
    object.__setattr__(self, "attention", AttentionOptions.parse(self.attention))
    RematPolicy.parse(self.remat)  # a bad name fails here, at the edge

  def replace(self, **kw) -> "ModelSpec":
    return dataclasses.replace(self, **kw)

  def build(self, rngs: nnx.Rngs) -> PixArtSigma:
    return PixArtSigma(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan=self.scan,
                       attention=self.attention, rngs=rngs)

  def split(self) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract params) of the model; the graphdef is what the train step merges params into."""
    graphdef, params, rest = nnx.split(abstract(self), nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError(f"the model has non-Param state the train state does not carry: {rest}")
    return graphdef, params


def abstract(spec: ModelSpec | DiTConfig) -> PixArtSigma:
  """The model with ShapeDtypeStruct leaves (no memory allocated); a bare DiTConfig means its default spec."""
  spec = spec if isinstance(spec, ModelSpec) else ModelSpec(spec)
  return nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
