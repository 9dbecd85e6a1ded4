"""Converted weights as Orbax checkpoints: fast to reload, restorable straight into any mesh's shardings.

Layout of a converted directory:
    DIR/pixart_config.json   the DiTConfig (dataclass fields)
    DIR/params/              an Orbax StandardCheckpointer tree of the nnx.Param state
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax.convert.hub import read_json
from pixart_jax.outputs import claim_output
from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.spec import ModelSpec, abstract
from pixart_jax.parallel.sharding import LOGICAL_RULES, state_shardings

CONFIG_FILE = "pixart_config.json"


def is_orbax_dir(path: str | os.PathLike) -> bool:
  p = pathlib.Path(path)
  return p.is_dir() and (p / CONFIG_FILE).exists() and (p / "params").is_dir()


def config_to_json(cfg: DiTConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> DiTConfig:
  """The architecture of a `pixart_config.json` (keys of older versions' run settings are dropped)."""
  return DiTConfig.from_dict(d, what=CONFIG_FILE)


def read_config(path: str | os.PathLike) -> DiTConfig:
  """The DiTConfig of a converted directory."""
  return config_from_json(read_json(pathlib.Path(path) / CONFIG_FILE, "DiT config"))


def save_transformer_orbax(model: PixArtSigma, out_dir: str | os.PathLike, *, overwrite: bool = False
                           ) -> pathlib.Path:
  """Writes the model's parameters and config; returns the directory. `out_dir` must be new, empty, or an earlier
  output of ours with `overwrite=True` (`pixart_jax.outputs.claim_output`): an unrelated `params/` is never deleted."""
  import orbax.checkpoint as ocp  # imported on use: `import pixart_jax` stays light

  out = claim_output(out_dir, tool="convert", overwrite=overwrite, write_marker=jax.process_index() == 0)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out / "params", nnx.state(model, nnx.Param), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    (out / CONFIG_FILE).write_text(json.dumps(config_to_json(model.cfg), indent=2))
  return out


def load_transformer_orbax(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                           mesh: jax.sharding.Mesh | None = None, rules=LOGICAL_RULES, remat: str = "none",
                           scan: bool = True, attention: AttentionOptions | str | None = None) -> PixArtSigma:
  """Restores a converted model; with `mesh`, every array is read directly into its sharding."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(path).absolute()
  spec = ModelSpec(read_config(path), dtype=dtype, param_dtype=param_dtype, remat=remat, scan=scan,
                   attention=attention)
  graphdef, params, rest = nnx.split(abstract(spec), nnx.Param, ...)
  if mesh is not None:
    shardings = state_shardings(params, mesh, rules)
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, params)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), params, shardings)
  restored = ocp.StandardCheckpointer().restore(path / "params", target)
  from pixart_jax.convert.strict import check_finite

  check_finite({tuple(k): v.get_value() if isinstance(v, nnx.Variable) else v
                for k, v in nnx.to_flat_state(restored)}, str(path))
  return nnx.merge(graphdef, restored, rest)
