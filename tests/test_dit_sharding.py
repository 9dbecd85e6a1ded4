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


def test_batch_sharding_follows_the_rules():
  """One batch placement for every caller: the `batch` rule's mesh axes (size > 1) over the leading dimension; a
  shape keeps only the axes whose running product divides the batch; inside `shard_map` the manual axes drop out
  and the enclosing `nnx.logical_axis_rules` apply."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = make_mesh([("data", 2), ("fsdp", 4)])
  rules = sharding.LOGICAL_RULES
  assert sharding.batch_spec(mesh, rules, 3) == P(("data", "fsdp"), None, None)
  assert sharding.batch_spec(mesh, rules, (8, 5)) == P(("data", "fsdp"), None)
  assert sharding.batch_spec(mesh, rules, (4, 5)) == P("data", None)  # 4 examples do not split 8 ways
  assert sharding.batch_spec(mesh, rules, (6,)) == P("data")
  assert sharding.batch_spec(mesh, rules, (3,)) == P(None)
  assert sharding.batch_shards(mesh, rules) == 8 and sharding.batch_axes(mesh, rules, 4) == ("data",)
  fsdp_only = tuple(dict(rules, batch="fsdp").items())
  assert sharding.batch_sharding(mesh, fsdp_only, 2) == NamedSharding(mesh, P("fsdp", None))
  assert sharding.batch_shards(mesh, fsdp_only) == 4
  with pytest.raises(ValueError, match="rank >= 1"):
    sharding.batch_spec(mesh, rules, ())

  seen = {}

  def local(x):
    seen["default"] = sharding.batch_spec(jax.sharding.get_abstract_mesh(), None, x.shape)
    with nnx.logical_axis_rules(fsdp_only):
      seen["fsdp_only"] = sharding.batch_spec(jax.sharding.get_abstract_mesh(), None, x.shape)
    return x

  with jax.set_mesh(mesh):
    jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"})(jnp.zeros((8, 3)))
  assert seen == {"default": P("fsdp", None), "fsdp_only": P("fsdp", None)}  # `data` is manual in there


def test_data_and_encoders_place_batches_by_the_rules():
  """The data pipeline and the encoders take the rules' batch axes (not a hard-coded data/fsdp pair)."""
  from pixart_jax.data import pipeline
  from pixart_jax.data.encoders import PretrainedEncoders

  mesh = make_mesh([("data", 2), ("fsdp", 4)])
  fsdp_only = tuple(dict(sharding.LOGICAL_RULES, batch="fsdp").items())
  assert pipeline.checked_batch_sharding(mesh, 4, fsdp_only).spec == jax.sharding.PartitionSpec("fsdp")
  with pytest.raises(ValueError, match=r"global_batch_size=4 is not divisible by the mesh's batch axes "
                                       r"\('data', 'fsdp'\) \(size 8\)"):
    pipeline.checked_batch_sharding(mesh, 4, sharding.LOGICAL_RULES)

  class _Vae:
    config = type("C", (), dict(latent_channels=4, downsample_factor=8, scaling_factor=0.13))

  class _Text:
    hidden_size = 8

  enc = PretrainedEncoders(_Text(), _Vae(), mesh=mesh, rules=fsdp_only)
  assert enc.sharding.spec == jax.sharding.PartitionSpec("fsdp") and enc.batch_multiple == 4
  enc = PretrainedEncoders(_Text(), _Vae(), mesh=mesh)
  assert enc.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")) and enc.batch_multiple == 8
