"""The demo's FID: its samples against the real digits in the SVM's input space, with the streamed statistics of
`metrics.fid_stats` (the stand-in for Inception features), next to prompt adherence."""
import numpy as np
import pytest
import scipy.linalg

from pixart_jax.data import demo as demo_data
from pixart_jax.demo import digit_features, digit_fid, real_digit_features, real_subset_fid


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
  """pytorch-fid's computation on all features at once: numpy mean / cov, scipy's sqrtm."""
  mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_digit_fid_of_the_real_digits():
  x, _ = demo_data.load_digits()
  real = demo_data.to_rgb(x).astype(np.float32) / 127.5 - 1.0  # the images the demo trains on, in [-1, 1]
  assert digit_fid(real) < 0.05  # only the uint8 rounding of the training images separates them
  shifted = np.clip(real[::3] + 0.25, -1, 1)  # brighter and fewer
  want = _scipy_fid(digit_features(shifted), real_digit_features())
  assert digit_fid(shifted) == pytest.approx(want, rel=1e-3)
  assert real_subset_fid(100) > real_subset_fid(900) > 0  # the small-sample bias the report's floor shows


@pytest.mark.slow  # builds on the session's trained demo
def test_demo_samples_fid_next_to_adherence(trained_demo):
  """The reloaded demo's samples (as the run drew them) score far nearer to the real digits than noise does, above
  the floor of as many real digits; the run's report holds the same numbers (runs of this version of the demo)."""
  from flax import nnx

  from pixart_jax.demo import sample_digits

  report = trained_demo.report
  graphdef, params = nnx.split(trained_demo.model, nnx.Param)
  guided, plain, labels = sample_digits(graphdef, params, trained_demo.encoders.text, 10, report["guidance_scale"],
                                        report["seed"] + 1)
  fid_g = digit_fid(trained_demo.encoders.decode(guided))
  fid_p = digit_fid(trained_demo.encoders.decode(plain))
  floor = real_subset_fid(len(labels))
  noise = digit_fid(np.random.default_rng(0).uniform(-1, 1, (len(labels), 8, 8, 3)))
  assert floor < fid_p < noise / 4 and floor < fid_g < noise / 4, (floor, fid_g, fid_p, noise)
  want = _scipy_fid(digit_features(trained_demo.encoders.decode(guided)), real_digit_features())
  assert fid_g == pytest.approx(want, rel=1e-3)
  if "fid_digits_guided" in report:  # a demo run of this version (the shared dev run may predate the field)
    assert report["fid_digits_guided"] == pytest.approx(fid_g, rel=0.02)
    assert report["fid_digits_unguided"] == pytest.approx(fid_p, rel=0.02)
    assert report["fid_digits_real_subset"] == pytest.approx(floor, rel=1e-9)
