"""Metric networks on the 8 fake devices: the batch split over the mesh's batch axes equals one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixart_jax.convert.strict import flat_targets, unflatten_into
from pixart_jax.metrics.clip import CLIPConfig, CLIPModel
from pixart_jax.metrics.inception import FIDInceptionV3, InceptionConfig
from pixart_jax.metrics.sharded import ShardedApply
from pixart_jax.parallel.mesh import make_mesh
from pixart_jax.parallel.sharding import LOGICAL_RULES

MESHES = {"data8": (("data", 8),), "data2_fsdp2_tensor2": (("data", 2), ("fsdp", 2), ("tensor", 2))}


def _sharded_axes(model) -> set:
  """Mesh axes any variable of `model` is split over (empty: everything replicated)."""
  specs = [v.get_value().sharding.spec for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(
      x, nnx.Variable))]
  return {a for spec in specs for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}


def _random(make, seed):
  """`make()` built abstractly and filled with numpy random values (an eager NNX init compiles one tiny
  program per parameter shape, minutes for ~100 convs on a loaded CPU)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng, flat = np.random.default_rng(seed), {}
  for path, t in flat_targets(state).items():
    if path[-1] == "var":  # BatchNorm variance
      a = 0.5 + rng.random(t.shape)
    elif len(t.shape) == 1 or path[-1] in ("bias", "mean"):
      a = (1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.standard_normal(t.shape)
    else:  # kernels (kh kw I O) / ([L] I O), tables: unit-variance outputs
      fan = np.prod(t.shape[:3]) if len(t.shape) == 4 else t.shape[-2]
      a = rng.standard_normal(t.shape) * (2.0 / fan) ** 0.5
    flat[path] = jnp.asarray(a, t.dtype)
  return nnx.merge(graphdef, unflatten_into(state, flat))


def _inception():
  return _random(lambda: FIDInceptionV3(InceptionConfig(width=0.0625), rngs=nnx.Rngs(0)), seed=0)


def _clip():
  cfg = CLIPConfig.from_hf_config({
      "projection_dim": 16,
      "text_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "max_position_embeddings": 12, "eos_token_id": 63},
      "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "image_size": 24, "patch_size": 8}})
  return _random(lambda: CLIPModel(cfg, rngs=nnx.Rngs(1)), seed=1)


@pytest.mark.parametrize("mesh_spec", list(MESHES))
def test_inception_batch_sharded_equals_single_device(mesh_spec):
  x = np.random.default_rng(0).random((5, 48, 40, 3), dtype=np.float32)  # 5 rows: padded to 8 on the mesh
  want = ShardedApply(_inception(), lambda net, im: net(im))(x)
  mesh = make_mesh(MESHES[mesh_spec])
  net = _inception()
  sharded = ShardedApply(net, lambda n, im: n(im), mesh)
  assert _sharded_axes(net) == set()  # the default rules replicate the Inception
  placed = sharded.place(x)[0]
  assert placed.shape[0] == 8 and placed.sharding.spec == P(("data", "fsdp") if "fsdp" in mesh_spec else "data")
  assert {s.data.shape[0] for s in placed.addressable_shards} == {8 // sharded.batch_shards}
  got = sharded(x)
  assert got.shape == want.shape == (5, 128)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("mesh_spec,rules", [("data8", ()), ("data2_fsdp2_tensor2", LOGICAL_RULES)])
def test_clip_batch_sharded_equals_single_device(mesh_spec, rules):
  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((6, 24, 24, 3)).astype(np.float32)
  ids = rng.integers(0, 63, (6, 12))
  ids[np.arange(6), rng.integers(2, 12, 6)] = 63
  mask = (np.arange(12)[None] <= np.argmax(ids == 63, axis=1)[:, None]).astype(np.int32)
  image = lambda m, x: m.image_features(x)  # noqa: E731
  text = lambda m, i, k: m.text_features(i, k)  # noqa: E731
  want_img, want_txt = ShardedApply(_clip(), image)(pixels), ShardedApply(_clip(), text)(ids, mask)
  mesh = make_mesh(MESHES[mesh_spec])
  model = _clip()
  got_img = ShardedApply(model, image, mesh, rules)(pixels)
  got_txt = ShardedApply(model, text, mesh, rules)(ids, mask)
  assert _sharded_axes(model) == (set() if rules == () else {"fsdp", "tensor"})
  np.testing.assert_allclose(got_img, want_img, rtol=1e-5, atol=1e-5 * np.abs(want_img).max())
  np.testing.assert_allclose(got_txt, want_txt, rtol=1e-5, atol=1e-5 * np.abs(want_txt).max())
