"""LoRA on the trainer: only adapters train, checkpoints hold only adapters, the adapter file merges into the base
model and the merged model equals base + adapter outputs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pixart_jax import lora
from pixart_jax.convert.dit import load_transformer
from pixart_jax.convert.orbax_io import save_transformer_orbax
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.train import loop
from pixart_jax.train.trainables import lora as lora_train
from train_testlib import fast_compiles, smoke_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  config = smoke_config()
  spec = loop.model_spec(config.model)
  model = PixArtSigma(spec.cfg, rngs=nnx.Rngs(5))
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # no zero-init layers (they would block gradients)
    x = v.get_value()
    v.set_value(x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype))
  base_dir = save_transformer_orbax(model, root / "base")
  config.init_from = str(base_dir)
  config.lora = mlc.ConfigDict(dict(rank=2, alpha=4.0, targets=lora.ATTENTION_TARGETS, rslora=False))
  config.steps, config.ckpt_every, config.optimizer.lr = 3, 3, 1e-2
  with fast_compiles(root / "xla_cache"):
    run = loop.train_and_evaluate(config, str(root / "run"))
  return dict(run=run, base_dir=base_dir, workdir=root / "run", spec=spec)


@pytest.mark.slow
def test_only_adapters_train_and_are_checkpointed(trained):
  run = trained["run"]
  assert run.step == 3 and math.isfinite(run.last_metrics["loss"])
  base = lora.flat_params(load_transformer(trained["base_dir"]))
  adapters = lora_train.from_state(run.state.params)
  assert sorted(adapters) == lora.select_targets(base, lora.LoraConfig())  # attention q/k/v/out kernels
  assert all(float(jnp.abs(ad["b"]).max()) > 0 for ad in adapters.values())  # B left its zero init
  # The checkpoint holds the adapters only (no base weights), and the whole config incl. lora.
  step_dir = trained["workdir"] / "checkpoints" / "3"
  saved = ocp.StandardCheckpointer().restore((step_dir / "state").absolute())
  assert sorted(saved["params"]) == sorted(run.state.params)
  assert all(set(v) == {"a", "b"} for v in saved["params"].values())
  opt_leaves = jax.tree.leaves(saved["opt_state"])
  n_adapter = sum(x.size for x in jax.tree.leaves(saved["params"]))
  assert sum(np.size(x) for x in opt_leaves) < 4 * n_adapter  # optimizer state sized by the adapters only
  # The adapter file equals the final adapters.
  files, cfg = lora.load_lora(trained["workdir"] / "lora")
  assert (cfg.rank, cfg.alpha) == (2, 4.0)
  for p, ad in adapters.items():
    np.testing.assert_array_equal(np.asarray(files[p]["a"]), np.asarray(ad["a"]))
    np.testing.assert_array_equal(np.asarray(files[p]["b"]), np.asarray(ad["b"]))


@pytest.mark.slow
def test_merged_model_is_base_plus_adapters(trained):
  adapters, cfg = lora.load_lora(trained["workdir"] / "lora")
  base_model = load_transformer(trained["base_dir"])
  base = lora.flat_params(base_model)
  merged_model = lora.merge_lora(load_transformer(trained["base_dir"]), adapters, cfg)
  merged = lora.flat_params(merged_model)
  for p, w in base.items():
    if p in adapters:  # W + scale A B
      want = np.asarray(w) + cfg.scale * np.einsum("...ir,...ro->...io", adapters[p]["a"], adapters[p]["b"])
      np.testing.assert_allclose(np.asarray(merged[p]), want, rtol=1e-6, atol=1e-7)
      assert not np.array_equal(np.asarray(merged[p]), np.asarray(w))
    else:  # frozen: bitwise the init_from weights
      np.testing.assert_array_equal(np.asarray(merged[p]), np.asarray(w))
  # Outputs: the merged model == the base model with the adapters applied on the fly (the train step's path).
  rng = np.random.default_rng(0)
  cfg_dit = trained["spec"].cfg
  x = jnp.asarray(rng.standard_normal((2, cfg_dit.sample_size, cfg_dit.sample_size, 4)), jnp.float32)
  t = jnp.asarray([10, 700])
  y = jnp.asarray(rng.standard_normal((2, 6, cfg_dit.caption_channels)), jnp.float32)
  mask = jnp.ones((2, 6), jnp.int32)
  graphdef, base_state = nnx.split(base_model, nnx.Param)
  on_the_fly = nnx.merge(graphdef, lora_train.params_fn(cfg)(lora_train.to_state(adapters), base_state))
  got, want = merged_model(x, t, y, mask), on_the_fly(x, t, y, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got) - np.asarray(base_model(x, t, y, mask))).max() > 1e-4


def test_the_config_picks_the_kind_of_training():
  """`trainables.select`: full fine-tuning (nothing frozen, no params function) unless config.lora has a rank;
  LoRA checks its needs up front, naming the field."""
  from pixart_jax.train import trainables
  from pixart_jax.train.trainables.full import FullTrainable

  config = smoke_config()
  spec = loop.model_spec(config.model)
  full = trainables.select(config, spec)
  assert type(full) is FullTrainable and full.frozen() == ((), ()) and full.params_fn is None
  assert full.export(None, "/nowhere") is None
  config.lora = mlc.ConfigDict(dict(rank=2, alpha=4.0, targets=lora.ATTENTION_TARGETS, rslora=False))
  with pytest.raises(ValueError, match="config.lora.*needs config.init_from"):
    trainables.select(config, spec)
  config.init_from = "/some/base"
  kind = trainables.select(config, spec)
  assert type(kind) is lora_train.LoraTrainable and kind.cfg == lora.LoraConfig(rank=2, alpha=4.0)
  assert kind.params_fn is not None and kind.label == "LoRA"
  config.sample.every = 5
  with pytest.raises(ValueError, match=r"sample.every > 0\) is not supported with config.lora"):
    trainables.select(config, spec)
  config.sample.every, config.lora.rank = 0, 0
  with pytest.raises(ValueError, match="lora.rank must be >= 1, got 0"):
    trainables.select(config, spec)
