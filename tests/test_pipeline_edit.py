"""Pipeline image-to-image / inpainting and the `sample` CLI's --init_image / --strength / --mask (tiny random
pipeline): the text-to-image limits, the VAE round trip at a strength that runs no step, paste-back, bad inputs."""
import numpy as np
import pytest

import pixart_jax as pj
from pixart_jax.testing import make_tiny_pipeline

SIZE = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))
  return path, pj.Pipeline.from_pretrained(path, dtype=np.float32)


def _image(seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (SIZE // 32, SIZE // 32, 3), dtype=np.uint8)  # blocky: survives a VAE
  return np.repeat(np.repeat(base, 32, 0), 32, 1)


def _mask():
  m = np.zeros((SIZE, SIZE), np.float32)
  m[SIZE // 2:] = 1.0  # repaint the bottom half
  return m


KW = dict(steps=4, guidance_scale=3.0, seed=3)


def test_text_to_image_limits(tiny):
  _, pipe = tiny
  t2i = pipe(["a cat"], height=SIZE, width=SIZE, **KW)
  np.testing.assert_array_equal(pipe(["a cat"], image=_image(), strength=1.0, **KW), t2i)
  np.testing.assert_array_equal(pipe(["a cat"], image=_image(), mask=np.ones((SIZE, SIZE)), **KW), t2i)
  edited = pipe(["a cat"], image=_image(), strength=0.5, **KW)
  assert np.abs(edited.astype(int) - t2i.astype(int)).mean() > 1


def test_strength_to_zero_returns_the_vae_round_trip(tiny):
  import jax.numpy as jnp

  _, pipe = tiny
  img = _image()
  out = np.asarray(pipe(["a cat"], image=img, strength=0.1, output="float", **KW))  # int(4 * 0.1) = 0 steps
  x = jnp.asarray(img[None].astype(np.float32) / 127.5 - 1.0)
  round_trip = np.asarray(pipe.vae.decode_scaled(pipe.vae.encode_scaled(x)))
  np.testing.assert_allclose(out, round_trip, atol=1e-4)  # jitted vs eager VAE: float reassociation only


def test_inpainting_paste_back_keeps_the_pixels(tiny):
  _, pipe = tiny
  img = _image()
  out = pipe(["a cat", "a dog"], image=img, mask=_mask(), paste_back=True, **KW)
  assert out.shape == (2, SIZE, SIZE, 3)
  np.testing.assert_array_equal(out[:, :SIZE // 2], np.broadcast_to(img[:SIZE // 2], out[:, :SIZE // 2].shape))
  plain = pipe(["a cat", "a dog"], image=img, mask=_mask(), **KW)
  np.testing.assert_array_equal(plain[:, SIZE // 2:], out[:, SIZE // 2:])  # the repainted half is the model's


@pytest.mark.parametrize("kw,match", [
    ({"strength": 0.5}, r"strength < 1 needs an image"),
    ({"mask": np.ones((SIZE, SIZE))}, r"a mask needs an image"),
    ({"image": _image(), "strength": 0.0}, r"strength must be a finite number > 0 and <= 1, got 0.0"),
    ({"image": _image(), "strength": 1.5}, r"strength must be a finite number > 0 and <= 1, got 1.5"),
    ({"image": _image()[..., :2]}, r"image must be an RGB image"),
    ({"image": np.full((SIZE, SIZE, 3), 2.0)}, r"image: float images must hold finite values in \[-1, 1\]"),
    ({"image": np.stack([_image()] * 3)}, r"image holds 3 images for 1 prompts"),
    ({"image": _image(), "height": 512}, r"image is 256x256 pixels .* but height=512"),
    ({"image": _image(), "mask": np.ones((SIZE, SIZE // 2))}, r"mask must have shape .* got \(256, 128\)"),
    ({"image": _image(), "mask": np.full((SIZE, SIZE), 2.0)}, r"mask must hold values in \[0, 1\]"),
])
def test_bad_edit_inputs(tiny, kw, match):
  _, pipe = tiny
  with pytest.raises(ValueError, match=match):
    pipe(["a cat"], steps=2, **kw)


def test_sample_cli_edit_flags(tiny, tmp_path):
  import subprocess
  import sys

  from PIL import Image

  path, _ = tiny
  img = _image()
  Image.fromarray(img).save(tmp_path / "init.png")
  Image.fromarray((_mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
  base = [sys.executable, "-m", "pixart_jax.sample", "--model", str(path), "--prompt", "a red car", "--steps", "3",
          "--dtype", "float32", "--init_image", str(tmp_path / "init.png")]
  r = subprocess.run(base + ["--mask", str(tmp_path / "mask.png"), "--paste_back", "--out", str(tmp_path / "out")],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  (png,) = sorted((tmp_path / "out").glob("0*.png"))
  im = Image.open(png)
  assert im.size == (SIZE, SIZE) and im.text["strength"] == "1.0" and im.text["mask"].endswith("mask.png")
  np.testing.assert_array_equal(np.asarray(im)[:SIZE // 2], img[:SIZE // 2])
  for extra, match in ((["--strength", "0"], "error: --strength must be a finite number > 0 and <= 1, got 0.0"),
                       (["--size", "64x64"], "error: --size 64x64 with --init_image"),
                       (["--mask", str(tmp_path / "nope.png")], "error: --mask")):
    r = subprocess.run(base + extra + ["--out", str(tmp_path / "bad")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(match), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_inpainting_on_a_mesh_matches_one_device(tiny):
  """The image latents and the latent mask are placed like the noise (batch over the mesh's data axes)."""
  from pixart_jax.parallel.mesh import make_mesh

  path, pipe = tiny
  sharded = pj.Pipeline.from_pretrained(path, dtype=np.float32, mesh=make_mesh([("data", 4), ("fsdp", 2)]))
  prompts = ["a cat", "a dog", "a car", "a tree"]
  kw = dict(KW, image=_image(), mask=_mask(), strength=0.8, output="float")
  got = sharded(prompts, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(pipe(prompts, **kw)), atol=2e-4)
