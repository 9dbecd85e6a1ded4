"""Weak-to-strong chain at smoke size: each stage trains FROM THE PREVIOUS STAGE'S WORKDIR (docs/ARCHITECTURE.md §5.7).

alpha-style Orbax dir (micro-conditions, PE 0.5) -> vae_adapt_256 -> upscale_512 -> upscale_1024 -> upscale_2k
                                                                                  \\-> kv_compress_1024
Per stage: the initial train state (a `steps=0` call of the trainer returns it) carries every predecessor
parameter bitwise, new KV-compression parameters sit at their average init (kernel 1/R^2, bias 0, LN (1, 0)),
dropped micro-condition weights are gone, the model has the stage's sample size / PE interpolation (and its PE
really differs from the predecessor's), and a 2-step run gives a finite loss and a checkpoint the next stage reads.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from pixart_jax.convert import ours
from pixart_jax.convert.orbax_io import save_transformer_orbax
from pixart_jax.models.config import get_preset
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.models.embeddings import sincos_2d
from pixart_jax.train import loop
from train_testlib import fast_compiles

ROOT = pathlib.Path(__file__).resolve().parents[1]
W2S = ROOT / "configs" / "weak_to_strong"
# (stage file, predecessor name, sample_size, interpolation_scale)
CHAIN = [("vae_adapt_256", "alpha", 4, 0.5), ("upscale_512", "vae_adapt_256", 8, 1.0),
         ("upscale_1024", "upscale_512", 16, 2.0), ("upscale_2k", "upscale_1024", 32, 4.0),
         ("kv_compress_1024", "upscale_1024", 16, 2.0)]
INIT = {"kernel": 0.25, "bias": 0.0, "norm_scale": 1.0, "norm_bias": 0.0}  # R = 2


def _recipe(name: str, init_from: str):
  spec = importlib.util.spec_from_file_location(f"_w2s_{name}", W2S / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(f"smoke,init_from={init_from}")


def _flat_layers(params, cfg) -> dict[str, np.ndarray]:
  flat = {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value() if isinstance(v, nnx.Variable) else v))
          for p, v in nnx.to_flat_state(params)}
  return ours.unstack_layers(flat, cfg)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("w2s")
  with fast_compiles(root / "xla_cache"):
    alpha_cfg = get_preset("tiny", micro_conditions=True, sample_size=4, image_size=32, interpolation_scale=0.5)
    dirs = {"alpha": str(save_transformer_orbax(PixArtSigma(alpha_cfg, rngs=nnx.Rngs(3)), root / "alpha"))}
    out = {}
    for name, prev, size, scale in CHAIN:
      config = _recipe(name, dirs[prev])
      spec = loop.model_spec(config.model)
      workdir = root / name
      config.steps = 0  # returns the state the trainer starts from, without training
      init = loop.train_and_evaluate(config, str(workdir))
      config.steps = 2
      run = loop.train_and_evaluate(config, str(workdir))
      dirs[name] = str(workdir)
      graphdef, _ = spec.split()
      pe = np.asarray(nnx.merge(graphdef, init.state.params).pos_embed(4, 4))
      out[name] = dict(prev=dirs[prev], spec=spec, init=_flat_layers(init.state.params, spec.cfg), run=run,
                       size=size, scale=scale, pe=pe, workdir=workdir)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CHAIN])
def test_stage_starts_from_its_predecessor(chain, name):
  st = chain[name]
  cfg = st["spec"].cfg
  prev = ours.open_ours(st["prev"])._t
  prev_cfg = ours.saved_config(st["prev"])
  new = st["init"]
  # The new config, PE included.
  assert (cfg.sample_size, cfg.interpolation_scale) == (st["size"], st["scale"])
  assert ours.saved_config(st["workdir"]) == cfg
  d = cfg.hidden_size
  np.testing.assert_allclose(st["pe"][0], sincos_2d(d, 4, 4, cfg.base_size, cfg.interpolation_scale), atol=1e-6)
  if name not in ("kv_compress_1024", "vae_adapt_256"):  # up-scaling: the new size AND the new interpolation
    assert prev_cfg.interpolation_scale != cfg.interpolation_scale and prev_cfg.base_size != cfg.base_size
    assert not np.allclose(st["pe"][0], sincos_2d(d, 4, 4, cfg.base_size, prev_cfg.interpolation_scale))
  # Carried over bitwise; new KV parameters at their average init; micro-conditions dropped.
  fresh = [k for k in new if "compress" in k]
  for key, value in new.items():
    if "compress" in key:
      np.testing.assert_array_equal(value, np.full_like(value, INIT[key.rsplit(".", 1)[1]]), err_msg=key)
    else:
      np.testing.assert_array_equal(value, prev[key], err_msg=key)
  assert bool(fresh) == (name == "kv_compress_1024")
  if name == "kv_compress_1024":
    assert cfg.kv_compress_layers and not prev_cfg.kv_compress_layers
  dropped = sorted(k for k in prev if k not in new)
  if name == "vae_adapt_256":
    assert dropped and all(k.startswith("micro.") for k in dropped)
  else:
    assert not dropped
  # The stage trains: finite loss, a checkpoint at step 2 the next stage can read.
  run = st["run"]
  assert run.step == 2 and math.isfinite(run.last_metrics["loss"])
  assert ours.workdir_step(st["workdir"]) == 2


def test_recipes_document_their_chain_and_cross_the_typed_boundary():
  """Each recipe: run command + smoke command in its docstring; full and smoke configs build; PE per docs/ARCHITECTURE.md §5.7."""
  interp = {"vae_adapt_256": 0.5, "upscale_512": 1.0, "upscale_1024": 2.0, "upscale_2k": 4.0, "kv_compress_1024": 2.0}
  readme = (W2S / "README.md").read_text()
  for name, scale in interp.items():
    spec = importlib.util.spec_from_file_location(f"_w2s_doc_{name}", W2S / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert f"--config configs/weak_to_strong/{name}.py" in mod.__doc__ and f"{name}.py:smoke" in mod.__doc__
    assert f"configs/weak_to_strong/{name}.py" in readme
    full, smoke = mod.get_config(), mod.get_config("smoke,init_from=/some/workdir")
    cfg = loop.model_spec(full.model).cfg
    assert cfg.interpolation_scale == scale and cfg.depth == 28
    assert bool(cfg.kv_compress_layers) == (name == "kv_compress_1024")
    assert smoke.init_from == "/some/workdir" and loop.model_spec(smoke.model).cfg.interpolation_scale == scale


def test_orbax_dir_loads_into_a_new_config_by_the_rules(tmp_path):
  """Fast unit check of `convert.ours` through `load_transformer`: micro-conditions dropped, KV params at the
  average init, the rest carried bitwise across a stage re-layout; other mismatches name the keys."""
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.convert.strict import WeightLoadError

  src_cfg = get_preset("tiny", micro_conditions=True, interpolation_scale=0.5)
  src = save_transformer_orbax(PixArtSigma(src_cfg, rngs=nnx.Rngs(1)), tmp_path / "src")
  new_cfg = get_preset("tiny", kv_compress_layers=(1,), sample_size=16, image_size=128, interpolation_scale=2.0)
  model = load_transformer(src, config=new_cfg)
  assert model.cfg == new_cfg
  new = _flat_layers(nnx.state(model, nnx.Param), new_cfg)
  prev = ours.open_ours(src)._t
  assert sorted(k for k in prev if k not in new) == sorted(k for k in prev if k.startswith("micro."))
  for key, value in new.items():
    want = np.full_like(value, INIT[key.rsplit(".", 1)[1]]) if "compress" in key else prev[key]
    np.testing.assert_array_equal(value, want, err_msg=key)
  with pytest.raises(WeightLoadError, match="layer indices 2 of 3 not filled"):  # 3 layers wanted, the checkpoint has 2
    load_transformer(src, config=get_preset("tiny", depth=3))
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    ours.open_ours(tmp_path)
