"""Export from a training checkpoint: a tiny model fine-tuned a few steps by our trainer (from the base pipeline's
transformer) -> `python -m pixart_jax.convert --source WORKDIR --to diffusers --base BASE --out DIR` -> diffusers'
PixArtSigmaPipeline output equals ours (`pixart_jax.Pipeline` with the workdir's weights) from the same latents."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pixart_jax as pj
from pixart_jax.convert.dit import load_transformer
from pixart_jax.lora import flat_params
from pixart_jax.testing import make_tiny_pipeline
from pixart_jax.train import loop
from train_testlib import ROOT, assert_matches_diffusers, fast_compiles, smoke_config, subprocess_env

# make_tiny_pipeline's transformer: sample_size 32, 2 layers, 2 heads x 8, caption_channels 32, PE 0.5.
TINY = dict(depth=2, hidden_size=16, num_heads=2, caption_channels=32, sample_size=32, image_size=256,
            interpolation_scale=0.5)


@pytest.mark.slow
def test_workdir_exports_to_a_diffusers_pipeline(tmp_path):
  base = make_tiny_pipeline(tmp_path / "base", seed=3)
  config = smoke_config(**{f"model.overrides.{k}": v for k, v in TINY.items()})
  config.init_from = str(base)
  config.steps, config.ckpt_every, config.optimizer.lr = 2, 2, 1e-3
  workdir = tmp_path / "run"
  with fast_compiles(tmp_path / "xla_cache"):
    run = loop.train_and_evaluate(config, str(workdir))
  assert run.step == 2 and np.isfinite(run.last_metrics["loss"])

  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, "-m", "pixart_jax.convert", f"--source={workdir}", "--to=diffusers",
                         f"--base={base}", f"--out={out}"], env=subprocess_env(tmp_path / "xla_cache", 1), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  trained = load_transformer(workdir)  # the workdir's newest checkpoint, independently of the export
  start = flat_params(load_transformer(base))
  assert any(not np.array_equal(v, start[p]) for p, v in flat_params(trained).items())  # really fine-tuned
  base_pipe = pj.Pipeline.from_pretrained(base, dtype=np.float32)
  assert_matches_diffusers(pj.Pipeline(base_pipe.text_encoder, trained, base_pipe.vae), out)
