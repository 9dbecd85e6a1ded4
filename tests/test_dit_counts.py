"""Exact parameter counts of the presets, from abstract shapes (nothing allocated)."""
import jax
import numpy as np
import pytest
from flax import nnx

from pixart_jax.models.config import PRESETS, get_preset
from pixart_jax.models.dit import count_params
from pixart_jax.models.spec import abstract

XL2 = 610_856_096


def test_xl2_count_and_variants():
  base = count_params(abstract(PRESETS["sigma-xl2-1024-ms"]))
  assert base == XL2
  assert count_params(abstract(PRESETS["alpha-xl2-1024-ms"])) == XL2 + 493_056
  assert count_params(abstract(PRESETS["sigma-xl2-1024-ms-kv"])) == XL2 + 112_896
  for name in ("sigma-xl2-256", "sigma-xl2-512-ms", "sigma-xl2-2k-ms"):
    assert count_params(abstract(PRESETS[name])) == XL2  # PE and sizes are not parameters


def test_abstract_model_allocates_nothing():
  m = abstract(PRESETS["sigma-xl2-2k-ms"])
  leaves = jax.tree.leaves(nnx.state(m))
  assert leaves and all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)


def test_stages_follow_kv_layers():
  cfg = get_preset("sigma-xl2-1024-ms-kv")
  assert cfg.stages() == [(0, 14, 1), (14, 14, 2)]
  assert get_preset("tiny", kv_compress_layers=(1,)).stages() == [(0, 1, 1), (1, 1, 2)]
  with pytest.raises(ValueError, match="kv_compress_layers"):
    get_preset("tiny", kv_compress_layers=(5,))
  with pytest.raises(ValueError, match="unknown DiT preset"):
    get_preset("xl3")


def test_every_param_has_logical_names():
  m = abstract(PRESETS["sigma-xl2-1024-ms-kv"])
  for path, v in nnx.state(m, nnx.Param).flat_state():
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(v.get_value().shape), path
