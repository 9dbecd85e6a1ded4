"""Export round trip: our (modified) transformer -> a complete diffusers directory -> diffusers pipeline output
equals ours with the same initial latents."""
import jax
import numpy as np
from flax import nnx

import pixart_jax as pj
from pixart_jax.convert.pipeline_export import export_pipeline
from pixart_jax.testing import make_tiny_pipeline
from train_testlib import assert_matches_diffusers


def test_export_pipeline_round_trip(tmp_path):
  base = make_tiny_pipeline(tmp_path / "base", seed=3)
  ours = pj.Pipeline.from_pretrained(base, dtype=np.float32)
  # Stand-in for a fine-tune: perturb every DiT parameter.
  for _, v in nnx.to_flat_state(nnx.state(ours.transformer, nnx.Param)):
    v.set_value(v.get_value() + 0.02 * jax.random.normal(jax.random.key(v.get_value().size), v.get_value().shape))
  ours = pj.Pipeline(ours.text_encoder, ours.transformer, ours.vae)
  out = export_pipeline(ours.transformer, base, tmp_path / "export")
  got, lat = assert_matches_diffusers(ours, out)
  base_img = pj.Pipeline.from_pretrained(base, dtype=np.float32)(["a cat on a sofa"], height=256, width=256, steps=5,
                                                                  guidance_scale=4.5, latents=lat)
  assert np.abs(base_img.astype(int) - got.astype(int)).mean() > 0.5  # the export carries the modified weights
