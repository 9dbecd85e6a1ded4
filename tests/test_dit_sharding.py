"""The DiT under an FSDP mesh on 8 fake devices: same output, and the large parameters really are sharded."""
import jax
import numpy as np
import pytest
from flax import nnx

from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.parallel import sharding
from pixart_jax.parallel.mesh import make_mesh, resolve_axis_sizes


def test_mesh_spec_rules():
  assert resolve_axis_sizes([("data", -1), ("fsdp", 4)], 8) == [("data", 2), ("fsdp", 4)]
  with pytest.raises(ValueError, match="at most one"):
    resolve_axis_sizes([("data", -1), ("fsdp", -1)], 8)
  with pytest.raises(ValueError, match="does not divide"):
    resolve_axis_sizes([("fsdp", 3), ("data", -1)], 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    resolve_axis_sizes([("model", 8)], 8)
  mesh = make_mesh([("fsdp", -1)])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}


def test_fsdp_forward_equals_unsharded():
  assert jax.device_count() == 8
  cfg = get_preset("tiny", hidden_size=64, num_heads=4, depth=3, kv_compress_layers=(2,))
  model = PixArtSigma(cfg, rngs=nnx.Rngs(0))
  for _, v in nnx.state(model, nnx.Param).flat_state():  # non-zero everywhere
    v.set_value(v.get_value() + 0.05 * np.random.default_rng(0).standard_normal(v.get_value().shape))
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 8, 12, 4)).astype(np.float32)
  t = np.array([1.0, 200.0, 500.5, 999.0], np.float32)
  y = rng.standard_normal((4, 16, 32)).astype(np.float32)
  mask = (np.arange(16)[None] < np.array([[1], [5], [16], [9]])).astype(np.int32)
  want = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, t, y, mask))

  mesh = make_mesh([("data", 2), ("fsdp", 4)])
  sharding.shard_model(model, mesh)
  params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  big = {p: a.sharding.spec for p, a in params.items() if a.size >= 64 * 64}
  assert big and all("fsdp" in jax.tree.leaves(tuple(s)) for s in big.values()), big
  with jax.set_mesh(mesh):
    got = nnx.jit(lambda m, *a: m(*a))(model, x, t, y, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
