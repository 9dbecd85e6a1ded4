"""strict.check_finite: NaN / inf weights are refused with the tensors named, in one compiled program for a whole
weights dict (a per-array eager check compiled one program per distinct shape: ~5 s per Inception load on CPU)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixart_jax.convert.strict import WeightLoadError, check_finite


def _weights(n: int, salt: int) -> dict:
  """n float arrays of n distinct shapes (never seen before in this process: `salt`), plus integer ones."""
  rng = np.random.default_rng(salt)
  flat = {("layer", i, "kernel"): jnp.asarray(rng.standard_normal((i + 1, 3 + salt)), jnp.float32) for i in range(n)}
  flat[("half",)] = jnp.ones((5, 7 + salt), jnp.bfloat16)
  flat[("host",)] = np.ones((2, 9 + salt), np.float32)
  flat[("steps",)] = jnp.arange(4 + salt)  # integers are not checked
  return flat


def test_refuses_nan_and_inf_naming_the_tensors():
  flat = _weights(8, salt=11)
  check_finite(flat, "ok.safetensors")
  flat[("layer", 2, "kernel")] = flat[("layer", 2, "kernel")].at[0, 1].set(jnp.nan)
  flat[("layer", 5, "kernel")] = flat[("layer", 5, "kernel")].at[1, 0].set(jnp.inf)
  flat[("half",)] = flat[("half",)].at[4, 0].set(-jnp.inf)
  with pytest.raises(WeightLoadError) as e:
    check_finite(flat, "bad.safetensors")
  assert str(e.value) == ("cannot load bad.safetensors: 3 tensor(s) hold NaN or inf values: half, layer/2/kernel, "
                          "layer/5/kernel")
  assert e.value.invalid == ["half", "layer/2/kernel", "layer/5/kernel"]


def test_many_shapes_compile_once(caplog):
  flat = _weights(40, salt=23)  # 42 floating arrays, 42 distinct shapes
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    check_finite(flat)
  compiles = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
  assert len(compiles) == 1, compiles


def test_sharded_and_mixed_placements():
  """Arrays sharded over a mesh, committed to one other device, and uncommitted are all checked (committed
  arrays on different devices go into separate calls). In a child with 4 CPU devices."""
  import os
  import pathlib
  import subprocess
  import sys

  code = """if True:
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pixart_jax.convert.strict import WeightLoadError, check_finite
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    sharded = jax.device_put(jnp.ones((8, 6)), NamedSharding(mesh, P("data", "model")))
    flat = {("a",): sharded, ("b",): jax.device_put(jnp.ones(3), jax.devices()[3]), ("c",): jnp.ones(5)}
    check_finite(flat)
    flat[("a",)] = jax.device_put(sharded.at[7, 5].set(jnp.nan), sharded.sharding)
    flat[("b",)] = jax.device_put(jnp.array([1.0, jnp.inf, 0.0]), jax.devices()[3])
    try:
      check_finite(flat, "w")
    except WeightLoadError as e:
      print(e)
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip() == "cannot load w: 2 tensor(s) hold NaN or inf values: a, b", res.stdout
