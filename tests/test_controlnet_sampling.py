"""ControlNet sampling: `Pipeline(..., control_image=, control_scale=)` (the control latent through both guidance
halves, scale 0 = the base model) and `python -m pixart_jax.sample --control IMG --controlnet WEIGHTS`."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pixart_jax as pj
from pixart_jax.convert.controlnet_keys import export_controlnet
from pixart_jax.diffusion import samplers
from pixart_jax.models.controlnet import with_control
from pixart_jax.testing import make_tiny_pipeline


def random_branch(base, n=1, seed=3):
  """A control branch with non-zero projections (a trained one's stand-in)."""
  model = with_control(base, n)
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model.controlnet, nnx.Param))):
    var.set_value(var.get_value() + 0.2 * jax.random.normal(jax.random.fold_in(key, i), var.shape))
  return model.controlnet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ctrl")
  path = make_tiny_pipeline(tmp / "pipe")
  base = pj.Pipeline.from_pretrained(path, dtype=np.float32)
  weights = export_controlnet(random_branch(base.transformer), base.transformer.cfg, tmp / "branch.safetensors")
  pipe = pj.Pipeline.from_pretrained(path, dtype=np.float32, controlnet=weights)
  img = (np.indices((96, 160)).sum(0)[..., None] % 32 * 8).astype(np.uint8).repeat(3, -1)
  return path, weights, base, pipe, img


def test_control_steers_and_matches_a_hand_written_guided_loop(tiny):
  _, _, base, pipe, img = tiny
  prompts, kw = ["a cat", "a dog"], dict(height=256, width=256, steps=4, guidance_scale=3.0, seed=1, output="float")
  plain = base(prompts, **kw)
  off = pipe(prompts, control_image=img, control_scale=0.0, **kw)
  on = pipe(prompts, control_image=img, **kw)
  np.testing.assert_allclose(np.asarray(off), np.asarray(plain), atol=1e-5)
  assert float(jnp.abs(on - plain).mean()) > 1e-2
  # the same numbers from a guided loop written out here: the control latent goes to both halves
  c = pipe.control_latents(img, 2, 256, 256)
  cond, uncond = pipe.encode(prompts), pipe.encode(["", ""])
  model = pipe.controlnet

  def model_fn(x, t):
    u = model(x, t, *uncond, control=c)
    v = model(x, t, *cond, control=c)
    return u + 3.0 * (v - u)

  x_t = pj.pipeline.initial_noise(1, 2, (32, 32, 4))
  x0 = samplers.sample("dpm-solver", model_fn, x_t, num_steps=4, key=jax.random.key(1))
  want = pipe._decode(pipe._vae_state, x0, height=256, width=256)
  np.testing.assert_allclose(np.asarray(on), np.asarray(want), atol=2e-4)


def test_bad_control_requests(tiny):
  _, _, base, pipe, img = tiny
  with pytest.raises(ValueError, match="control_image needs a ControlNet"):
    base(["x"], height=256, width=256, steps=2, control_image=img)
  # one validator for every image input (checks.image): one line naming control_image, the value, what is valid
  h, w = img.shape[:2]
  for bad, prompts, want in [
      (img[..., 0], ["x"], "control_image must be an RGB image: (H W 3) or (B H W 3), uint8 0..255 or float in "
                           f"[-1, 1], or a PIL image; got ndarray of shape ({h}, {w}) and dtype uint8"),
      (img.astype(np.uint16), ["x"], "control_image: integer images must be uint8 (0..255), got uint16"),
      (img.astype(np.float32), ["x"], "control_image: float images must hold finite values in [-1, 1], got values "
                                      f"in [{img.min():g}, {img.max():g}]"),
      (np.stack([img] * 3), ["x", "y"], "control_image holds 3 images for 2 prompts: give one image or one per prompt"),
  ]:
    with pytest.raises(ValueError) as e:
      pipe(prompts, height=256, width=256, steps=2, control_image=bad)
    assert str(e.value) == want
  with pytest.raises(ValueError, match="control_scale"):
    pipe(["x"], height=256, width=256, steps=2, control_image=img, control_scale=float("nan"))


def test_sample_cli_control(tiny, tmp_path):
  from PIL import Image

  path, weights, _, _, img = tiny
  Image.fromarray(img).save(tmp_path / "edges.png")
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "pixart_jax.sample", "--model", str(path), "--prompt", "a red car", "--size",
         "256x256", "--steps", "2", "--dtype", "float32", "--out", str(tmp_path / "out")]
  r = subprocess.run(cmd + ["--control", str(tmp_path / "edges.png"), "--controlnet", str(weights),
                            "--control_scale", "0.5"], capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  (png,) = sorted((tmp_path / "out").glob("0*.png"))
  meta = Image.open(png).text
  assert meta["control"] == str(tmp_path / "edges.png") and meta["control_scale"] == "0.5"
  r = subprocess.run(cmd + ["--control", str(tmp_path / "edges.png")], capture_output=True, text=True, env=env,
                     timeout=600)
  assert r.returncode == 1 and "--controlnet WEIGHTS go together" in r.stderr and "Traceback" not in r.stderr
  (tmp_path / "junk.png").write_bytes(b"not an image")
  r = subprocess.run(cmd + ["--control", str(tmp_path / "junk.png"), "--controlnet", str(weights)],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 1 and "junk.png: " in r.stderr and "give a PNG / JPEG" in r.stderr and "Traceback" not in r.stderr


def test_sharded_control_sampling_equals_one_device(tiny):
  from pixart_jax.parallel.mesh import make_mesh

  path, weights, _, pipe, img = tiny
  sharded = pj.Pipeline.from_pretrained(path, dtype=np.float32, mesh=make_mesh([("data", 4), ("fsdp", 2)]),
                                        controlnet=weights)
  prompts = ["a cat", "a dog", "a car", "a tree"]
  kw = dict(height=256, width=256, steps=3, guidance_scale=3.0, seed=3, output="float", control_image=img)
  np.testing.assert_allclose(np.asarray(sharded(prompts, **kw)), np.asarray(pipe(prompts, **kw)), atol=1e-4)
