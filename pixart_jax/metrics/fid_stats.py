"""FID activation statistics: streamed on the host in float64, mergeable, saved as pytorch-fid `.npz` files.

    stats = ActivationStats(2048)
    for images in batches:
      stats.update(inception(images))           # B D features; a jax.Array is fetched to the host
    ref = FIDStats.load("fid_stats_coco.npz")    # or stats.fid_stats().save("mine.npz")
    fid = frechet_distance(*stats.fid_stats(), *ref)

`ActivationStats` keeps n, the sum of the features (D) and the sum of their outer products (D D), all float64,
so two accumulators (other batches, hosts, or a resumed run) merge by addition. From them:

  mu    = sum / n
  sigma = (outer - n mu mu^T) / (n - 1)        the unbiased covariance, as `numpy.cov(act, rowvar=False)`

which pytorch-fid's `calculate_activation_statistics` computes from all activations at once
(src/pytorch_fid/fid_score.py). In float64 the cancellation in `outer - n mu mu^T` costs about
1e-16 * |mu|^2 / var relative error per entry, negligible for Inception features (|mu| and the spread are
of the same order).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator

import numpy as np

__all__ = ["ActivationStats", "FIDStats"]


@dataclasses.dataclass(frozen=True)
class FIDStats:
  """Mean `mu` (D,) and covariance `sigma` (D, D) of the features of an image set (float64)."""
  mu: np.ndarray
  sigma: np.ndarray
  num_samples: int | None = None  # informational; pytorch-fid's files do not have it

  def __post_init__(self):
    mu, sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(f"FID statistics need mu (D,) and sigma (D, D); got mu {mu.shape}, sigma {sigma.shape}")
    object.__setattr__(self, "mu", mu)
    object.__setattr__(self, "sigma", sigma)

  def __iter__(self) -> Iterator[np.ndarray]:
    """`mu, sigma = stats` (e.g. `frechet_distance(*a, *b)`)."""
    return iter((self.mu, self.sigma))

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Writes a pytorch-fid `.npz` (`mu`, `sigma`; plus `num_samples` when known). An existing file is kept
    (FileExistsError) unless `overwrite`."""
    path = pathlib.Path(path)
    if path.suffix != ".npz":
      raise ValueError(f"FID statistics path {str(path)!r} must end in .npz (numpy would append it)")
    if path.exists() and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    extra = {} if self.num_samples is None else {"num_samples": np.int64(self.num_samples)}
    np.savez_compressed(path, mu=self.mu, sigma=self.sigma, **extra)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FIDStats":
    """Reads a pytorch-fid (or our) `.npz` with `mu` and `sigma`."""
    path = pathlib.Path(path)
    try:
      f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path} is not an FID statistics .npz: {e}") from None
    if not hasattr(f, "files"):
      raise ValueError(f"{path} is a single .npy array, not an FID statistics .npz with mu and sigma")
    with f:
      missing = [k for k in ("mu", "sigma") if k not in f.files]
      if missing:
        raise ValueError(f"{path} is not an FID statistics file: it has no {missing} (it holds {sorted(f.files)})")
      try:
        return cls(f["mu"][:], f["sigma"][:], int(f["num_samples"]) if "num_samples" in f.files else None)
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class ActivationStats:
  """Running n, sum (D,) and sum of outer products (D, D) of feature vectors, float64, on the host."""

  def __init__(self, dim: int):
    if dim < 1:
      raise ValueError(f"feature dim must be >= 1, got {dim}")
    self.dim = int(dim)
    self.n = 0
    self.total = np.zeros(self.dim, np.float64)
    self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features) -> "ActivationStats":
    """Adds a batch `features` (B D) (numpy or a fully addressable jax.Array); returns self."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"features must be (B, {self.dim}), got shape {f.shape}")
    if not np.isfinite(f).all():
      raise ValueError(f"features hold {int((~np.isfinite(f)).sum())} non-finite values")
    self.n += f.shape[0]
    self.total += f.sum(axis=0)
    self.outer += f.T @ f
    return self

  def merge(self, other: "ActivationStats") -> "ActivationStats":
    """Adds another accumulator (other batches / hosts / a resumed run) into this one; returns self."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
    self.n += other.n
    self.total += other.total
    self.outer += other.outer
    return self

  def mean(self) -> np.ndarray:
    """(D,) float64."""
    if self.n < 1:
      raise ValueError("no features accumulated")
    return self.total / self.n

  def covariance(self) -> np.ndarray:
    """(D, D) float64, unbiased (divides by n - 1 like numpy.cov)."""
    if self.n < 2:
      raise ValueError(f"the covariance needs at least 2 samples, have {self.n}")
    mu = self.mean()
    cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return (cov + cov.T) / 2  # exactly symmetric

  def fid_stats(self) -> FIDStats:
    return FIDStats(self.mean(), self.covariance(), self.n)

  def state_dict(self) -> dict[str, np.ndarray]:
    """Arrays to checkpoint a partial pass (see `from_state_dict`)."""
    return {"n": np.int64(self.n), "total": self.total.copy(), "outer": self.outer.copy()}

  @classmethod
  def from_state_dict(cls, state) -> "ActivationStats":
    total = np.asarray(state["total"], np.float64)
    out = cls(total.shape[0])
    outer = np.asarray(state["outer"], np.float64)
    if outer.shape != (out.dim, out.dim):
      raise ValueError(f"state 'outer' has shape {outer.shape}, expected {(out.dim, out.dim)}")
    out.n, out.total, out.outer = int(state["n"]), total.copy(), outer.copy()
    return out
