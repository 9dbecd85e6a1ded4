"""Text -> image end to end against diffusers' PixArtSigmaPipeline (tiny random weights, same initial latents)."""
import numpy as np
import pytest
import torch

import pixart_jax as pj
from pixart_jax.testing import make_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from diffusers import PixArtSigmaPipeline

  path = make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))
  ref = PixArtSigmaPipeline.from_pretrained(path, torch_dtype=torch.float32)
  ref.set_progress_bar_config(disable=True)
  ours = pj.Pipeline.from_pretrained(path, dtype=np.float32)
  return path, ref, ours


@pytest.mark.parametrize("size,guidance", [((256, 256), 4.5), ((192, 320), 4.5), ((256, 256), 1.0),
                                            ((288, 224), 3.0)])
def test_matches_diffusers(tiny, size, guidance):
  _, ref, ours = tiny
  prompts = ["A photo of a cat sitting on a red sofa", "an astronaut riding a horse"]
  h, w = size
  bh, bw, _, _ = ours.resolve_size(h, w, True)
  lat = np.random.default_rng(h + w).standard_normal((2, bh // 8, bw // 8, 4)).astype(np.float32)
  want = ref(prompts, height=h, width=w, num_inference_steps=8, guidance_scale=guidance,
             latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()), output_type="np",
             clean_caption=False).images
  want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
  got = ours(prompts, height=h, width=w, steps=8, guidance_scale=guidance, latents=lat)
  assert got.shape == want.shape == (2, h, w, 3) and got.dtype == np.uint8
  diff = np.abs(got.astype(int) - want.astype(int))
  assert diff.max() <= 2, (diff.max(), diff.mean())  # a couple of uint8 levels at most


def test_second_call_does_not_recompile_and_seeds(tiny):
  _, _, ours = tiny
  n0 = ours.num_traces
  a = ours(["a cat"], height=256, width=256, steps=4, guidance_scale=2.0, seed=1)
  n1 = ours.num_traces
  b = ours(["a dog"], height=256, width=256, steps=4, guidance_scale=5.0, seed=1)  # new prompt and scale: same program
  assert ours.num_traces == n1 and n1 <= n0 + 1
  c = ours(["a cat"], height=256, width=256, steps=4, guidance_scale=2.0, seed=2)
  again = ours(["a cat"], height=256, width=256, steps=4, guidance_scale=2.0, seed=1)
  np.testing.assert_array_equal(a, again)
  assert np.abs(a.astype(int) - c.astype(int)).mean() > 1 and np.abs(a.astype(int) - b.astype(int)).mean() > 0
  # image i's noise does not depend on its batch (the images then agree up to float reassociation)
  np.testing.assert_array_equal(pj.pipeline.initial_noise(1, 2, (32, 32, 4))[0], pj.pipeline.initial_noise(1, 1, (32, 32, 4))[0])
  pair = ours(["a cat", "a dog"], height=256, width=256, steps=4, guidance_scale=2.0, seed=1)
  assert np.abs(pair[0].astype(int) - a[0].astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["diffusers", "official"])
def test_trimmed_captions_give_the_full_length_images(tiny, mode):
  """trim_captions (the default) samples at the caption bucket of the longest prompt: same images as all 300
  positions, to float rounding, in both guidance modes (official: the negative branch reads the null caption's
  pad rows under the prompts' mask, which trimming keeps)."""
  _, _, ours = tiny
  prompts = ["a cat", "an astronaut riding a horse on the moon at night, oil painting"]
  emb, mask = ours.encode(prompts, trim_captions=True)
  assert emb.shape[1] == mask.shape[1] == 64 and int(mask.sum(axis=1).max()) > 32  # 38 tokens (tiny tokenizer)
  kw = dict(height=256, width=256, steps=4, guidance_scale=4.5, guidance_mode=mode, output="float", seed=3)
  n0 = ours.num_traces
  trimmed = ours(prompts, **kw)
  assert ours.num_traces == n0 + 1
  ours(["a dog", "an astronaut riding a horse on mars at dawn, watercolor painting"], **kw)
  assert ours.num_traces == n0 + 1  # another caption length in the same bucket: the same program
  full = ours(prompts, trim_captions=False, **kw)
  assert ours.num_traces == n0 + 2  # the 300-token program
  np.testing.assert_allclose(np.asarray(trimmed), np.asarray(full), rtol=0, atol=2e-5)
  assert np.abs(np.asarray(full)).max() > 0.1


def test_bad_requests(tiny):
  _, _, ours = tiny
  with pytest.raises(ValueError, match="aspect"):
    ours(["x"], height=256, width=2048, steps=2)
  with pytest.raises(ValueError, match="unknown sampler"):
    ours(["x"], sampler="euler")
  with pytest.raises(ValueError, match="latents must have shape"):
    ours(["x"], height=256, width=256, latents=np.zeros((1, 8, 8, 4), np.float32), steps=2)


def test_sample_cli(tiny, tmp_path):
  import subprocess
  import sys

  from PIL import Image

  path, _, _ = tiny
  (tmp_path / "prompts.txt").write_text("a cat\n\na dog on a beach\n")
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
  r = subprocess.run([sys.executable, "-m", "pixart_jax.sample", "--model", str(path), "--prompts_file",
                      str(tmp_path / "prompts.txt"), "--prompt", "a red car", "--size", "320x192", "--steps", "3",
                      "--guidance", "3", "--seed", "5", "--dtype", "float32", "--out", str(tmp_path / "out"),
                      "--offload_text_encoder"],  # one device: T5 kept on the host between encodes
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  pngs = sorted((tmp_path / "out").glob("0*.png"))
  assert len(pngs) == 3
  im = Image.open(pngs[0])
  assert im.size == (320, 192)
  assert im.text["prompt"] == "a red car" and im.text["seed"] == "5" and im.text["sampler"] == "dpm-solver"
  sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
  assert sheet.size == (2 * 320, 2 * 192)


def test_sharded_sampling_on_mesh(tiny):
  """The batch is sharded over the mesh's data axis; results equal the single-device run."""
  import jax

  from pixart_jax.parallel.mesh import make_mesh

  path, _, ours = tiny
  mesh = make_mesh([("data", 4), ("fsdp", 2)])
  sharded = pj.Pipeline.from_pretrained(path, dtype=np.float32, mesh=mesh)
  prompts = ["a cat", "a dog", "a car", "a tree", "a ship", "a cup", "a hat", "a fox"]
  want = ours(prompts, height=256, width=256, steps=3, guidance_scale=3.0, seed=3, output="float")
  got = sharded(prompts, height=256, width=256, steps=3, guidance_scale=3.0, seed=3, output="float")
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


def test_training_sample_hook_draws_what_the_pipeline_draws(tiny):
  """The training grid (`train.sample_hook`, prompts and "" encoded once at the caption bucket of the longest
  prompt) is the Pipeline's text-to-image at the model's size, image for image."""
  from types import SimpleNamespace

  import jax
  from flax import nnx

  from pixart_jax.images import contact_sheet, to_uint8
  from pixart_jax.models.spec import ModelSpec
  from pixart_jax.parallel.mesh import make_mesh
  from pixart_jax.parallel.sharding import LOGICAL_RULES
  from pixart_jax.train.sample_hook import make_sample_fn

  path, _, ours = tiny
  prompts = ("a cat", "an astronaut riding a horse on the moon at night, oil painting")
  sample_cfg = SimpleNamespace(pipeline=str(path), prompts=prompts, seed=4, sampler="dpm-solver", num_steps=3,
                               guidance=4.5)
  spec = ModelSpec(ours.transformer.cfg)
  graphdef, _ = spec.split()
  params = nnx.state(ours.transformer, nnx.Param)
  mesh = make_mesh([("data", 1)], devices=jax.devices()[:1])
  sheet = make_sample_fn(sample_cfg, spec, graphdef, mesh, LOGICAL_RULES, caption_len=300)(params, 0)["samples"]
  side = ours.transformer.cfg.sample_size * 8
  want = ours(list(prompts), height=side, width=side, steps=3, guidance_scale=4.5, seed=4, output="float",
              use_resolution_binning=False)
  want = np.asarray(contact_sheet(to_uint8(want), cols=2))
  assert sheet.shape == want.shape == (side, 2 * side, 3)
  assert np.abs(sheet.astype(int) - want.astype(int)).max() <= 1
  assert sheet.std() > 1


def test_offloaded_text_encoder_gives_the_same_images(tiny):
  """offload_text_encoder=True: T5's weights stay on the host between calls; the images do not change."""
  import jax
  from flax import nnx

  path, _, ours = tiny
  off = pj.Pipeline.from_pretrained(path, dtype=np.float32, offload_text_encoder=True)
  kw = dict(height=256, width=256, steps=3, guidance_scale=4.5, seed=2, output="float")
  np.testing.assert_allclose(np.asarray(off(["a cat"], **kw)), np.asarray(ours(["a cat"], **kw)), rtol=0, atol=1e-5)
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(nnx.state(off.text_encoder.encoder)))
