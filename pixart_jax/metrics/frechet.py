"""The Frechet distance between two Gaussians (FID), on the host in float64.

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))

method="sqrtm" (default) is pytorch-fid's `calculate_frechet_distance` (src/pytorch_fid/fid_score.py, after
Dougal J. Sutherland's stable version): `scipy.linalg.sqrtm(sigma1 @ sigma2)`; if the root is not finite
(near-singular product) retry with eps * I added to both covariances; a complex result is accepted only when
the imaginary part of its diagonal is within 1e-3 of zero, and then its real part is used.

method="eigh" computes the same trace from symmetric eigendecompositions: with A = sigma1^(1/2) (eigh of
sigma1, negative rounding eigenvalues clipped), sigma1 sigma2 is similar to the PSD matrix A sigma2 A, so
tr(sqrt(sigma1 sigma2)) = sum sqrt(eigvalsh(A sigma2 A)). It needs no complex arithmetic and is well defined for
rank-deficient covariances (fewer samples than dimensions); it agrees with "sqrtm" to ~1e-12 relative on
well-conditioned statistics.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

__all__ = ["frechet_distance", "trace_sqrt_product", "METHODS"]

METHODS = ("sqrtm", "eigh")
_PSD_TOL = 1e-6  # eigenvalues below -_PSD_TOL * max|eigenvalue| mean the matrix is not a covariance


def _check(mu1, sigma1, mu2, sigma2):
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,):
    raise ValueError(f"mean vectors must both be (D,); got {mu1.shape} and {mu2.shape}")
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must both be ({d}, {d}); got {sigma1.shape} and {sigma2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.isfinite(a).all():
      raise ValueError(f"{name} holds non-finite values")
  return mu1, sigma1, mu2, sigma2


def _sqrtm_trace(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                  RuntimeWarning, stacklevel=3)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2): the "
                       "statistics are not valid covariances, or too few samples were used")
    covmean = covmean.real
  return float(np.trace(covmean))


def _psd_eigh(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  scale = max(np.abs(w).max(), np.finfo(np.float64).tiny)
  if w.min() < -_PSD_TOL * scale:
    raise ValueError(f"{name} is not positive semi-definite (eigenvalue {w.min():.3g}, largest {scale:.3g}): "
                     "not a covariance matrix")
  return np.clip(w, 0.0, None), v


def _eigh_trace(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  w, v = _psd_eigh(sigma1, "sigma1")
  _psd_eigh(sigma2, "sigma2")
  root = (v * np.sqrt(w)) @ v.T                     # sigma1^(1/2), symmetric PSD
  inner = root @ sigma2 @ root
  lam = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, *, method: str = "sqrtm",
                       eps: float = 1e-6) -> float:
  """tr(sqrt(sigma1 @ sigma2)) by `method` ("sqrtm": pytorch-fid's algorithm; "eigh": see the module doc)."""
  if method == "sqrtm":
    return _sqrtm_trace(sigma1, sigma2, eps)
  if method == "eigh":
    return _eigh_trace(sigma1, sigma2)
  raise ValueError(f"method={method!r} is not one of {METHODS}")


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "sqrtm", eps: float = 1e-6) -> float:
  """FID between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D). Returns a python float.

  eps: the diagonal offset of pytorch-fid's retry when sqrtm(sigma1 @ sigma2) is not finite ("sqrtm" only).
  """
  mu1, sigma1, mu2, sigma2 = _check(mu1, sigma1, mu2, sigma2)
  diff = mu1 - mu2
  tr_covmean = trace_sqrt_product(sigma1, sigma2, method=method, eps=eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
