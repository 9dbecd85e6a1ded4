"""The memory planner (pixart_jax.plan / parallel.planning) and the analytic FLOP counter (models.flops)."""
import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixart_jax.models import flops
from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.parallel import chips, cost_estimate, planning, sampling_layout, sampling_plans
from pixart_jax.parallel.mesh import make_mesh
from pixart_jax.plan import main as plan_main
from pixart_jax.train.optimizers import OptimizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def analytic_params(cfg) -> int:
  """Parameter count from the architecture (docs/ARCHITECTURE.md §2.12 generalised; no micro-conditions, no KV compression)."""
  d, dm, p, c, co, dc = (cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size, cfg.in_channels, cfg.out_channels,
                         cfg.caption_channels)
  embed = (p * p * c * d + d) + (256 * d + d + d * d + d) + (d * 6 * d + 6 * d) + (dc * d + d + d * d + d)
  block = 6 * d + 8 * (d * d + d) + (d * dm + dm) + (dm * d + d)
  final = 2 * d + d * p * p * co + p * p * co
  return embed + cfg.depth * block + final


def test_analytic_param_formula_is_the_spec_count():
  assert analytic_params(get_preset("sigma-xl2-1024-ms")) == 610_856_096  # docs/ARCHITECTURE.md §2.12


def test_train_plan_tiny_fsdp8():
  mesh = make_mesh([("fsdp", 8)])
  cfg = get_preset("tiny")
  work = planning.Workload(cfg, (8, 8), 8, dtype=jnp.float32)
  adamw = OptimizerConfig.from_dict(dict(name="adamw", betas=(0.9, 0.999), eps=1e-8))
  p = planning.plan_train(work, mesh, optimizer=adamw)
  total = analytic_params(cfg)
  assert p.total_params == total
  even = total * 4 / 8  # fp32 parameters split over 8 devices
  assert even <= p.params <= 1.15 * even, (p.params, even)  # only small vectors (biases, norms) stay replicated
  assert abs(p.optimizer - 2 * p.params) <= 64  # AdamW: mu and nu shaped like the params (+ a step counter)
  assert p.temp > 0 and p.argument >= p.params + p.optimizer + p.inputs
  assert p.alias > 0  # the state is donated
  assert p.peak == p.argument + p.output - p.alias + p.temp + p.code
  assert p.flops_analytic == pytest.approx(flops.dit_train_flops(cfg, 8, 8, cfg.max_caption_len, 8) / 8)
  assert all(v.startswith("fits") for v in p.verdicts().values())


def test_plan_cli_json_parses():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "pixart_jax.plan", "--preset", "tiny", "--mesh", "fsdp=4,data=2",
                        "--what", "denoise", "--dtype", "float32", "--json"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  doc = json.loads(out.stdout.strip().splitlines()[-1])
  (p,) = doc["plans"]
  assert p["what"] == "denoise" and p["devices"] == 8 and p["mesh"]["fsdp"] == 4 and p["mesh"]["data"] == 2
  assert p["total_params"] == analytic_params(get_preset("tiny"))
  assert p["params"] < p["total_params"] * 4 / 2  # sharded 4 ways over fsdp
  assert p["temp"] > 0 and p["batch"] == 8 and set(p["verdicts"]) == set(planning.HBM_BYTES)
  cfg = get_preset("tiny")
  want = flops.sampling_flops(cfg, 8, 8, 20, batch=8, guidance=True, caption_len=cfg.max_caption_len) / 8
  assert p["flops_analytic"] == pytest.approx(want)


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "tiny", "--mesh", "fsdp"], "AXIS=SIZE"),
    (["--preset", "tiny", "--mesh", "fsdp=8", "--res", "100x64"], "multiples of 8"),
    (["--preset", "nope", "--mesh", "fsdp=8"], "unknown DiT preset"),
    (["--preset", "tiny", "--mesh", "fsdp=8", "--what", "eval"], "--what"),
    (["--preset", "tiny", "--mesh", "fsdp=4"], "already runs jax with 8 devices"),  # in-process: no re-exec
    (["--preset", "tiny", "--mesh", "fsdp=8", "--vae-tile", "0"], "--vae-tile"),
    (["--config", "configs/nope.py", "--devices", "8"], "no such file"),
])
def test_plan_cli_bad_input(argv, msg, monkeypatch):
  for var in ("XLA_FLAGS", "JAX_PLATFORMS"):  # main() sets them; restore after the test
    monkeypatch.setenv(var, os.environ.get(var, ""))
  with pytest.raises(ValueError, match=msg):  # the console entry turns it into `error: ...`, exit 1
    plan_main(argv)


def test_flops_reproduce_spec_table():
  """docs/ARCHITECTURE.md §3.6: MACs of one forward, no CFG, 300 caption tokens, R = 2 in layers 14-27."""
  macs = lambda name, s, **kw: flops.dit_forward_flops(get_preset(name, **kw), s, s, 300) / 2
  assert macs("sigma-xl2-1024-ms", 128) / 1e12 == pytest.approx(3.31, abs=0.01)
  assert macs("sigma-xl2-1024-ms-kv", 128) / 1e12 == pytest.approx(2.91, abs=0.01)
  assert macs("sigma-xl2-2k-ms", 256) / 1e12 == pytest.approx(26.18, abs=0.01)
  assert macs("sigma-xl2-2k-ms-kv", 256) / 1e12 == pytest.approx(19.69, abs=0.01)
  no_kv, kv = macs("sigma-xl2-4k", 512, kv_compress_layers=()), macs("sigma-xl2-4k", 512)
  assert no_kv / 1e12 == pytest.approx(312.46, abs=0.01) and kv / 1e12 == pytest.approx(208.56, abs=0.01)
  assert 1 - kv / no_kv == pytest.approx(0.333, abs=0.001)


def test_flops_match_xla_count_of_unrolled_forward():
  """The analytic count vs XLA's cost analysis of the unscanned forward (which also counts elementwise ops)."""
  cfg = get_preset("tiny", depth=3, kv_compress_layers=(2,))
  model = nnx.eval_shape(lambda: PixArtSigma(cfg, scan=False, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, x, t, y, m: nnx.merge(graphdef, st)(x, t, y, m))
  sds = jax.ShapeDtypeStruct
  compiled = fwd.lower(state, sds((2, 16, 16, 4), jnp.float32), sds((2,), jnp.float32),
                       sds((2, cfg.max_caption_len, cfg.caption_channels), jnp.float32),
                       sds((2, cfg.max_caption_len), jnp.int32)).compile()
  xla = compiled.cost_analysis()["flops"]
  ours = flops.dit_forward_flops(cfg, 16, 16, cfg.max_caption_len, batch=2)
  assert 0.9 * xla <= ours <= xla, (ours, xla)


# configs/demo.py is left out: the demo's pixel "VAE" downsamples by 2, not the SDXL VAE's 8 that plans assume
RECIPES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not f.endswith("demo.py")) + sorted(
    f for sub in ("weak_to_strong", "distill") for f in glob.glob(os.path.join(ROOT, "configs", sub, "*.py"))
    if not os.path.basename(f).startswith("_"))


def test_every_recipe_is_listed():
  assert len(RECIPES) >= 11 and all(os.path.isfile(f) for f in RECIPES)


@pytest.mark.parametrize("recipe", [os.path.relpath(f, ROOT) for f in RECIPES])
def test_plan_config_every_recipe_at_smoke_size(recipe, monkeypatch):
  """`plan --config RECIPE:smoke --devices 8` plans what the recipe trains: its preset + overrides (the smoke
  size), its mesh (data=-1 over the 8 devices), global batch, dtype, remat and attention backend."""
  for var in ("XLA_FLAGS", "JAX_PLATFORMS"):
    monkeypatch.setenv(var, os.environ.get(var, ""))
  from pixart_jax.plan import _load_config, recipe_settings
  from pixart_jax.train.loop import model_spec

  config = _load_config(os.path.join(ROOT, recipe) + ":smoke")
  spec = model_spec(config.model)  # what the trainer builds from the same recipe
  plans = plan_main(["--config", os.path.join(ROOT, recipe) + ":smoke", "--devices", "8", "--what", "train",
                     "--json"])
  (p,) = plans
  distill = bool(config.distill.enabled)  # a distillation recipe plans its student + frozen teacher step
  assert p["what"] == ("distill" if distill else "train") and p["error"] is None
  assert p["mesh"]["data"] == 8 and p["devices"] == 8  # the recipe's mesh (("data", -1),) over 8 devices
  b = config.data.batch_size
  assert p["batch"] == b and b % 8 == 0
  h = spec.cfg.sample_size
  assert p["res"] == [8 * h, 8 * h]
  from pixart_jax.models.spec import abstract
  want = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract(spec), nnx.Param)))
  assert p["total_params"] == want  # the recipe's overrides (smoke size, KV compression layers) were planned
  assert p["attention"] == "blockwise"  # auto on the CPU
  assert p["flops_analytic"] == pytest.approx(
      flops.dit_train_flops(spec.cfg, h, h, spec.cfg.max_caption_len, b) / 8 * (2 if distill else 1))
  r = recipe_settings(config)
  assert r["dtype"] == "float32" and r["remat"] == "none"  # smoke: what the plan compiled
  assert p["params"] * 8 >= want * 4  # fp32 parameters (the recipe's param dtype), replicated over data


def test_plan_config_full_size_reads_recipe(monkeypatch):
  """A full recipe (no :smoke): its global batch, bf16 compute, remat full and fsdp mesh reach the plan (the
  compile is skipped: only the settings are checked)."""
  from pixart_jax.plan import _load_config, recipe_settings

  r = recipe_settings(_load_config(os.path.join(ROOT, "configs", "pixart_sigma_1024_ms.py")))
  assert r["preset"] == "sigma-xl2-1024-ms" and r["batch"] == 256 and r["mesh"] == "fsdp=-1"
  assert r["dtype"] == "bfloat16" and r["remat"] == "full" and r["attention"].backend.value == "auto"
  assert all(v is not None for v in r["overrides"].values())


def test_plan_sample_is_the_whole_pipeline_with_tiles(monkeypatch):
  """--what sample: T5 encode, the CFG denoising loop and the VAE decode, each with the other models resident;
  a forced tile size plans the tiled decode (one tile program + the full-size blend buffers)."""
  for var in ("XLA_FLAGS", "JAX_PLATFORMS"):
    monkeypatch.setenv(var, os.environ.get(var, ""))
  plans = plan_main(["--preset", "tiny", "--mesh", "data=8", "--res", "128x128", "--what", "sample", "--dtype",
                     "float32", "--vae-tile", "8", "--json"])
  enc, den, dec = plans
  assert [enc["what"], den["what"]] == ["encode", "denoise"]
  assert dec["what"] == "decode (9 tiles of 8)"  # 16 latent cells, tiles of 8 overlapping by 2: starts 0, 6, 8
  for p, others in ((enc, (den, dec)), (den, (enc, dec)), (dec, (enc, den))):
    assert p["resident"] >= sum(o["params"] for o in others)
  # the tiled decode's resident bytes include the (B, 128, 128, 3) f32 accumulator (batch 8 over 8 devices)
  assert dec["resident"] - enc["params"] - den["params"] >= 128 * 128 * 3 * 4
  untiled = plan_main(["--preset", "tiny", "--mesh", "data=8", "--res", "128x128", "--what", "decode", "--dtype",
                       "float32", "--json"])[0]
  assert untiled["what"] == "decode" and untiled["temp"] > dec["temp"]  # one 8x8 tile needs less than 16x16
  # --offload-text-encoder: T5's weights are on the device while encoding only
  off = plan_main(["--preset", "tiny", "--mesh", "data=8", "--res", "128x128", "--what", "sample", "--dtype",
                   "float32", "--vae-tile", "8", "--offload-text-encoder", "--json"])
  assert off[0]["resident"] == enc["resident"] and enc["params"] > 0
  for got, want in zip(off[1:], (den, dec)):
    assert got["resident"] == want["resident"] - enc["params"]


@pytest.mark.parametrize("width, height", [(1024, 1024), (2048, 2048), (3840, 2160), (4096, 4096)])
def test_planner_decode_tiling_is_the_pipelines(width, height):
  """The planner's decode tile (`sampling_plans.pipeline_tile`, used by `plan_pipeline` and `plan --what decode`)
  is the one `Pipeline.layout` picks for the same image: untiled up to 2048 px a side, 128-latent tiles above."""
  from types import SimpleNamespace

  from pixart_jax.models.vae import VAEConfig
  from pixart_jax.pipeline import Pipeline

  cfg = get_preset("sigma-xl2-4k")
  pipe = SimpleNamespace(transformer=SimpleNamespace(cfg=cfg), vae=SimpleNamespace(config=VAEConfig.sdxl()),
                         mesh=None)
  layout = Pipeline.layout(pipe, 1, height, width)
  assert sampling_plans.pipeline_tile(height, width) == layout.vae_tile_latent
  assert (layout.vae_tile_latent is None) == (max(width, height) <= 2048)
  if layout.vae_tile_latent:  # plan_decode's overlap is the rule's, as the Pipeline's
    assert sampling_layout.vae_tiling(height, width, tile_latent=layout.vae_tile_latent)[1] == layout.overlap_latent
  # on a 16 GiB v5e (the Colab chip) the Pipeline and the planner also tile 2048 px (untiled: 19.6 GiB)
  v5e = [SimpleNamespace(device_kind="TPU v5 lite")] * 4
  pipe.mesh = SimpleNamespace(devices=np.asarray(v5e, dtype=object), shape={"data": 4}, axis_names=("data",))
  small = Pipeline.layout(pipe, 4, height, width)
  assert sampling_plans.pipeline_tile(height, width, v5e) == small.vae_tile_latent
  assert (small.vae_tile_latent is None) == (max(width, height) <= 1024)


def test_device_memory_by_chip():
  from types import SimpleNamespace as D

  assert chips.device_memory([D(device_kind="TPU v5 lite"), D(device_kind="TPU v5")]) == 16 * 2**30
  assert chips.device_memory([D(device_kind="TPU v6 lite")]) == 32 * 2**30
  assert chips.device_memory([D(device_kind="cpu")]) is None and chips.device_memory([]) is None
  assert sampling_layout.vae_tiling(2048, 1536, device_bytes=16 * 2**30) == (128, 32)
  assert sampling_layout.vae_tiling(2048, 1536, device_bytes=32 * 2**30) == (None, 0)
  assert sampling_layout.vae_tiling(1024, 1024, device_bytes=16 * 2**30) == (None, 0)


def test_cost_estimate_is_the_compilers_seconds_times_units():
  """The compiler's estimate: its seconds x the loop's trip count, MFU against the chip's bf16 peak; no seconds
  (the CPU backend) -> no predicted time."""
  from pixart_jax.parallel import chips

  raw = dict(flops=2e12, bytes=1e9, seconds=0.01)
  c = cost_estimate.estimate(raw, 20, 4.0e13, "TPU v5 lite", "test")
  assert c["predicted_seconds"] == pytest.approx(0.2) and c["flops"] == pytest.approx(4e13)
  assert c["chip"] == "v5e" and c["mfu"] == pytest.approx(4.0e13 / (0.2 * chips.BY_NAME["v5e"].bf16_flops))
  assert "estimate" in c["label"] and "not a measurement" in c["label"]
  cpu = cost_estimate.estimate(dict(flops=1.0, bytes=1.0, seconds=None), 3, 1.0, "cpu", "test")
  assert cpu["predicted_seconds"] is None and cpu["mfu"] is None and cpu["flops"] == 3.0
  compiled = jax.jit(lambda a: a @ a).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
  got = cost_estimate.compiled_cost(compiled)
  assert got["flops"] == pytest.approx(2 * 64**3, rel=0.05) and got["bytes"] > 0
