"""FID statistics (streamed, merged, .npz) and the Frechet distance against numpy / scipy references."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from pixart_jax.metrics import frechet
from pixart_jax.metrics.fid_stats import ActivationStats, FIDStats
from pixart_jax.metrics.frechet import frechet_distance

D = 48


def _features(n, seed, shift=0.0, scale=1.0):
  """Correlated, non-negative-mean features (like pool3 activations after ReLU + average pooling)."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((D, D)) / np.sqrt(D)
  return (np.abs(rng.standard_normal((n, D))) @ mix + 0.5) * scale + shift


def _scipy_fid(a, b):
  """The direct reference: one-shot numpy statistics, scipy.linalg.sqrtm, real part (pytorch-fid's formula)."""
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _streamed(a, sizes):
  stats, start = ActivationStats(a.shape[1]), 0
  for n in sizes:
    stats.update(a[start:start + n])
    start += n
  assert start == len(a)
  return stats


def test_streamed_and_merged_statistics_equal_one_shot_numpy():
  a = _features(400, seed=0)
  one_shot = (a.mean(0), np.cov(a, rowvar=False))
  streamed = _streamed(a, [1, 7, 64, 128, 200])
  merged = _streamed(a[:137], [100, 37]).merge(_streamed(a[137:], [263]))  # e.g. two hosts
  resumed = ActivationStats.from_state_dict(_streamed(a[:50], [50]).state_dict()).update(a[50:])
  from_device = _streamed(jnp.asarray(a, jnp.float32), [400])  # jax arrays are fetched (float32 here)
  for stats in (streamed, merged, resumed):
    assert stats.n == 400
    np.testing.assert_allclose(stats.mean(), one_shot[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(stats.covariance(), one_shot[1], rtol=1e-11, atol=1e-13)
  np.testing.assert_allclose(from_device.covariance(), np.cov(a.astype(np.float32), rowvar=False), rtol=1e-6)
  assert np.array_equal(streamed.covariance(), streamed.covariance().T)
  with pytest.raises(ValueError, match=r"features must be \(B, 48\), got shape \(3, 47\)"):
    streamed.update(a[:3, :47])
  with pytest.raises(ValueError, match="1 non-finite"):
    streamed.update(np.where(np.arange(D) == 3, np.nan, a[:1]))
  with pytest.raises(ValueError, match="at least 2 samples, have 1"):
    ActivationStats(D).update(a[:1]).covariance()


def test_fid_of_a_set_with_itself_is_zero():
  stats = _streamed(_features(400, seed=1), [150, 250]).fid_stats()
  for method in frechet.METHODS:
    fid = frechet_distance(*stats, *stats, method=method)
    assert abs(fid) < 1e-6 * np.trace(stats.sigma), (method, fid)


@pytest.mark.parametrize("shift,scale", [(0.3, 1.0), (0.0, 1.7), (-0.2, 0.6)])
def test_fid_against_a_shifted_scaled_set_equals_the_scipy_reference(shift, scale):
  a = _features(500, seed=2)
  b = _features(450, seed=3, shift=shift, scale=scale)  # other samples, shifted and scaled
  want = _scipy_fid(a, b)
  sa, sb = _streamed(a, [200, 300]).fid_stats(), _streamed(b, [450]).fid_stats()
  for method in frechet.METHODS:
    got = frechet_distance(*sa, *sb, method=method)
    assert abs(got - want) <= 1e-3 * abs(want), (method, got, want)
  assert abs(frechet_distance(*sa, *sb, method="eigh") - frechet_distance(*sa, *sb)) <= 1e-9 * abs(want)


def test_fid_of_an_affine_copy_has_the_closed_form():
  """b = c a + s: sigma_b = c^2 sigma_a, so FID = |mu_a - mu_b|^2 + (1 - c)^2 tr(sigma_a)."""
  a = _features(300, seed=4)
  c, s = 1.3, np.linspace(-0.2, 0.4, D)
  sa, sb = _streamed(a, [300]).fid_stats(), _streamed(c * a + s, [300]).fid_stats()
  want = np.sum((sa.mu - sb.mu) ** 2) + (1 - c) ** 2 * np.trace(sa.sigma)
  for method in frechet.METHODS:
    np.testing.assert_allclose(frechet_distance(*sa, *sb, method=method), want, rtol=1e-9)


def test_rank_deficient_covariances():
  """Fewer samples than dimensions: eigh equals sum(sqrt(eig(sigma1 sigma2))) (its eigenvalues are real >= 0)."""
  s1, s2 = _streamed(_features(20, 5), [20]).fid_stats(), _streamed(_features(30, 6, 0.1), [30]).fid_stats()
  lam = np.linalg.eigvals(s1.sigma @ s2.sigma)
  want = np.sqrt(np.clip(lam.real, 0, None)).sum()
  got = frechet.trace_sqrt_product(s1.sigma, s2.sigma, method="eigh")
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sqrtm_retry_and_imaginary_check(monkeypatch):
  """pytorch-fid's safeguards: eps * I retry when the root is not finite; refuse a large imaginary part."""
  with pytest.raises(ValueError, match="Imaginary component 1.0"):
    frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
    frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="eigh")
  calls, real = [], scipy.linalg.sqrtm

  def flaky(m):
    calls.append(m.copy())
    return np.full_like(m, np.nan) if len(calls) == 1 else real(m)

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
  sigma = np.diag([4.0, 9.0])
  with pytest.warns(RuntimeWarning, match="adding 0.01 to diagonal"):
    fid = frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma, eps=0.01)
  np.testing.assert_array_equal(calls[1], (sigma + 0.01 * np.eye(2)) @ (sigma + 0.01 * np.eye(2)))
  np.testing.assert_allclose(fid, 2 * 13 - 2 * (4.01 + 9.01))
  with pytest.raises(ValueError, match=r"covariances must both be \(2, 2\)"):
    frechet_distance(np.zeros(2), sigma, np.zeros(2), np.eye(3))
  with pytest.raises(ValueError, match="method='svd' is not one of"):
    frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma, method="svd")


def test_npz_is_pytorch_fid_compatible_and_never_overwritten(tmp_path):
  stats = _streamed(_features(100, 7), [100]).fid_stats()
  path = stats.save(tmp_path / "stats.npz")
  with np.load(path) as f:  # pytorch-fid's compute_statistics_of_path
    m, s = f["mu"][:], f["sigma"][:]
  np.testing.assert_array_equal(m, stats.mu)
  np.testing.assert_array_equal(s, stats.sigma)
  back = FIDStats.load(path)
  assert back.num_samples == 100 and np.array_equal(back.sigma, stats.sigma)
  np.savez_compressed(tmp_path / "theirs.npz", mu=m, sigma=s)  # a file written by pytorch-fid --save-stats
  assert FIDStats.load(tmp_path / "theirs.npz").num_samples is None
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match="stats.npz exists"):
    FIDStats(np.zeros(D), np.eye(D)).save(path)
  assert path.read_bytes() == before
  with pytest.raises(ValueError, match=r"must end in \.npz"):
    stats.save(tmp_path / "stats")
  np.savez(tmp_path / "bad.npz", mu=m)
  with pytest.raises(ValueError, match=r"bad\.npz is not an FID statistics file: it has no \['sigma'\]"):
    FIDStats.load(tmp_path / "bad.npz")
  np.savez(tmp_path / "shape.npz", mu=m, sigma=s[:, :3])
  with pytest.raises(ValueError, match=r"shape\.npz: FID statistics need mu \(D,\) and sigma \(D, D\)"):
    FIDStats.load(tmp_path / "shape.npz")
