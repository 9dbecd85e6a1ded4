"""The DiT against diffusers' PixArtTransformer2DModel (random weights, fp32, CPU), loaded through our loader."""
import numpy as np
import pytest
import torch

import pixart_jax.convert.dit as dit_convert
from dit_reference import diffusers_forward, rel_err, tiny_diffusers_transformer

CASES = [
    # (layers, heads, head_dim, caption_channels, sample_size, interpolation_scale, micro, latent HxW)
    dict(layers=2, heads=2, head_dim=8, caption_channels=24, sample_size=8, scale=1.0, micro=False, hw=(8, 12)),
    dict(layers=3, heads=4, head_dim=6, caption_channels=16, sample_size=16, scale=0.5, micro=False, hw=(12, 8)),
    dict(layers=2, heads=3, head_dim=8, caption_channels=20, sample_size=8, scale=2.0, micro=True, hw=(10, 6)),
]


def _inputs(hw, caption_channels, seed, b=3, s=7):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, *hw, 4)).astype(np.float32)
  t = np.array([0.0, 10.5, 999.0][:b], np.float32)
  y = rng.standard_normal((b, s, caption_channels)).astype(np.float32)
  lens = [1, 4, s][:b]
  mask = np.array([[1] * n + [0] * (s - n) for n in lens], np.int64)
  return x, t, y, mask


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c['layers']}h{c['heads']}s{c['scale']}m{int(c['micro'])}")
def test_forward_matches_diffusers(tmp_path, case):
  ref = tiny_diffusers_transformer(layers=case["layers"], heads=case["heads"], head_dim=case["head_dim"],
                                   caption_channels=case["caption_channels"], sample_size=case["sample_size"],
                                   interpolation_scale=case["scale"], micro=case["micro"])
  ref.save_pretrained(tmp_path / "transformer")
  model = dit_convert.load_transformer(tmp_path / "transformer")
  assert model.cfg.micro_conditions == case["micro"]
  x, t, y, mask = _inputs(case["hw"], case["caption_channels"], seed=case["layers"])
  kw = {}
  if case["micro"]:
    kw = dict(resolution=np.array([[512.0, 768.0], [1024, 1024], [640, 320]], np.float32),
              aspect_ratio=np.array([[1.5], [1.0], [0.5]], np.float32))
  want = diffusers_forward(ref, x, t, y, mask, **kw)
  got = np.asarray(model(x, t, y, mask, **kw))
  assert got.shape == want.shape == (3, *case["hw"], 8)
  assert rel_err(got, want) <= 1e-5, rel_err(got, want)
  # Padded caption tokens must not matter: scramble them.
  y2 = y.copy()
  y2[mask == 0] = 100.0
  assert rel_err(np.asarray(model(x, t, y2, mask, **kw)), want) <= 1e-5


def test_pipeline_dir_and_unscanned_path(tmp_path):
  """A whole pipeline directory resolves to its transformer/; the unscanned python loop gives the same output."""
  ref = tiny_diffusers_transformer()
  ref.save_pretrained(tmp_path / "pipe" / "transformer")
  x, t, y, mask = _inputs((8, 8), 24, seed=3, b=2)
  want = diffusers_forward(ref, x, t, y, mask)
  for scan in (True, False):
    model = dit_convert.load_transformer(tmp_path / "pipe", scan=scan, remat="full")
    assert rel_err(np.asarray(model(x, t, y, mask)), want) <= 1e-5


def test_components_pe_and_timestep():
  """2-D PE for non-square grids and timestep embedding at fractional t, against diffusers functions."""
  from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed

  from pixart_jax.models.embeddings import sincos_2d, timestep_sinusoid

  for (h, w), base, scale in [((64, 64), 64, 2.0), ((32, 128), 64, 2.0), ((128, 32), 64, 2.0), ((88, 44), 64, 2.0),
                              ((9, 5), 16, 0.5), ((3, 7), 32, 1.0)]:
    want = get_2d_sincos_pos_embed(1152, (h, w), base_size=base, interpolation_scale=scale, output_type="np")
    got = sincos_2d(1152, h, w, base, scale)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  t = np.array([0.0, 1.5, 500.0, 949.05, 999.0], np.float32)
  want = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(t)).numpy()
  got = np.asarray(timestep_sinusoid(t, 256))
  # fp32 sin/cos of arguments up to ~1000 carry |t| * 2^-24-sized errors in any implementation: compare both
  # with the float64 truth, and with each other.
  k = np.arange(128, dtype=np.float64)
  args = t.astype(np.float64)[:, None] * np.exp(-np.log(10000.0) * k / 128)[None]
  truth = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  assert np.max(np.abs(got - truth)) <= 1000 * 2.0**-24  # half an ulp of the largest argument
  assert np.max(np.abs(want - truth)) <= 1e-4
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got[:2], want[:2], atol=1e-6, rtol=0)  # small t: tight


@pytest.mark.parametrize("hw", [(8, 12), (12, 6)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_forward_matches_diffusers_at_large_and_fractional_t(tmp_path, hw):
  """t = 999, 500.5, 3 on a non-square grid, tight: the timestep frequencies are the references' float32 ones.

  With float64 frequencies (rounded) the model at t = 999 sat ~1.5e-5 (relative) away from diffusers."""
  ref = tiny_diffusers_transformer(layers=2, heads=2, head_dim=8, caption_channels=24, sample_size=8)
  ref.save_pretrained(tmp_path / "transformer")
  model = dit_convert.load_transformer(tmp_path / "transformer")
  x, _, y, mask = _inputs(hw, 24, seed=5)
  for t in (999.0, 500.5, 3.0):
    tt = np.full((3,), t, np.float32)
    want = diffusers_forward(ref, x, tt, y, mask)
    got = np.asarray(model(x, tt, y, mask))
    assert rel_err(got, want) <= 1e-6, (t, rel_err(got, want))  # measured 4.6e-7 (float64 frequencies: 1.9e-6)


def test_timestep_frequencies_are_the_references_float32_ones():
  """The 128 frequencies equal torch's float32 `exp(-log(10000) * arange(128, dtype=float32) / 128)` to 1 ulp
  (the exponent is float32 exactly as in the references; only exp's last-bit rounding may differ)."""
  import math

  from diffusers.models.embeddings import get_timestep_embedding

  from pixart_jax.models.embeddings import timestep_frequencies, timestep_sinusoid

  want_f = torch.exp(-math.log(10000.0) * torch.arange(0, 128, dtype=torch.float32) / 128).numpy()
  got_f = timestep_frequencies(128, 10000.0)
  assert got_f.dtype == np.float32
  ulps = np.abs(got_f.view(np.int32) - want_f.view(np.int32))
  assert ulps.max() <= 1 and np.sum(ulps > 0) <= 8, ulps
  t = np.array([999.0, 500.5, 3.0], np.float32)
  want = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
  got = np.asarray(timestep_sinusoid(t, 256))
  # a one-ulp frequency moves the argument t * f by at most one ulp of t (fp32 sin/cos of ~1000)
  np.testing.assert_allclose(got, want, atol=999 * 2.0**-23, rtol=0)
