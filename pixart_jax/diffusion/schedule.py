"""The discrete Gaussian diffusion process of PixArt-Sigma (IDDPM `GaussianDiffusion`, docs/ARCHITECTURE.md §4.1).

Tables are built once in float64 numpy (exactly as the official code does) and cast to float32
when they are gathered inside JAX code, so schedule arithmetic runs in float32 whatever the
model dtype. Arrays are NHWC; `t` is a (B,) integer array of timestep indices.

`DiffusionSchedule.linear()` is the PixArt schedule: betas = linspace(1e-4, 0.02, 1000).
`schedule.respace(100)` is the IDDPM `SpacedDiffusion` (`space_timesteps` semantics): a shorter
process over a subset of the original timesteps, whose betas are recomputed from the kept
alphas_cumprod and whose `timestep_map` gives the original timestep each index stands for (the
model is always called with the original timestep).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
  """IDDPM `get_named_beta_schedule('linear', N)`: linspace(1e-4, 0.02) * 1000/N, float64."""
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
  """IDDPM `space_timesteps`: which original timesteps a respaced process keeps (sorted).

  `section_counts`: an int (one section), a comma-separated string ("10,15,20"), a list of
  counts per equal-size section, or "ddimN" (the fixed integer stride of the DDIM paper).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(
          f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  elif isinstance(section_counts, (int, np.integer)):
    section_counts = [int(section_counts)]
  section_counts = list(section_counts)
  if not section_counts or any(c < 1 for c in section_counts):
    raise ValueError(f"section counts must be positive integers, got {section_counts}")
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide a section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


def _bcast(v: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """(B,) -> (B, 1, ..., 1) with `ndim` dims."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class DiffusionSchedule:
  """Tables of a discrete diffusion process (all float64 numpy, length N).

  Attributes: betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
  sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
  posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2,
  log_betas, timestep_map (int64: original timestep of each index), num_timesteps.
  """

  def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | None = None):
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
      raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must lie in (0, 1]")
    n = betas.size
    self.num_timesteps = n
    self.timestep_map = (np.arange(n, dtype=np.int64) if timestep_map is None
                         else np.asarray(timestep_map, dtype=np.int64))
    if self.timestep_map.shape != (n,):
      raise ValueError(f"timestep_map must have shape ({n},), got {self.timestep_map.shape}")
    self.betas = betas
    self.log_betas = np.log(betas)
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    self.alphas_cumprod = acp
    self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
    self.sqrt_alphas_cumprod = np.sqrt(acp)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - acp)
    # The posterior variance is 0 at t = 0: the log is clipped to the value at t = 1.
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - acp)
    self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - acp)

  @classmethod
  def linear(cls, num_timesteps: int = 1000) -> "DiffusionSchedule":
    """The PixArt schedule: linear betas 1e-4 -> 0.02 over 1000 steps."""
    return cls(linear_betas(num_timesteps))

  def respace(self, section_counts: int | str | Sequence[int]) -> "DiffusionSchedule":
    """IDDPM `SpacedDiffusion`: keep `space_timesteps(N, section_counts)` of this process."""
    use = space_timesteps(self.num_timesteps, section_counts)
    kept = self.alphas_cumprod[use]
    prev = np.append(1.0, kept[:-1])
    return DiffusionSchedule(1.0 - kept / prev, timestep_map=self.timestep_map[use])

  # ---- float32 (JAX) ----------------------------------------------------------------------

  def table_f32(self, name: str) -> jnp.ndarray:
    """One float64 table (e.g. "alphas_cumprod") as a float32 jnp array of shape (N,)."""
    table = getattr(self, name, None)
    if not isinstance(table, np.ndarray) or table.dtype != np.float64:
      raise ValueError(f"{name!r} is not a float64 table of this schedule")
    return jnp.asarray(table, jnp.float32)

  def _take(self, table: np.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """table[t] as float32, shaped (B, 1, ..., 1) for broadcasting against NHWC arrays."""
    return _bcast(jnp.asarray(table, jnp.float32)[t], ndim)

  def q_sample(self, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise.  x0, noise: (B, H, W, C); t: (B,) int."""
    if x0.shape != noise.shape:
      raise ValueError(f"x0 {x0.shape} and noise {noise.shape} must have the same shape")
    x0 = x0.astype(jnp.float32)
    return (self._take(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
            self._take(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise.astype(jnp.float32))

  def q_posterior(self, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
    """q(x_{t-1} | x_t, x0): returns (mean, variance, log_variance_clipped), each like x_t."""
    nd = x_t.ndim
    mean = (self._take(self.posterior_mean_coef1, t, nd) * x0
            + self._take(self.posterior_mean_coef2, t, nd) * x_t)
    var = jnp.broadcast_to(self._take(self.posterior_variance, t, nd), x_t.shape)
    log_var = jnp.broadcast_to(self._take(self.posterior_log_variance_clipped, t, nd), x_t.shape)
    return mean, var, log_var

  def predict_x0_from_eps(self, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """x0 = sqrt(1/acp_t) x_t - sqrt(1/acp_t - 1) eps."""
    nd = x_t.ndim
    return self._take(self.sqrt_recip_alphas_cumprod, t, nd) * x_t - self._take(
        self.sqrt_recipm1_alphas_cumprod, t, nd) * eps

  def learned_range_log_variance(self, v: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """IDDPM LEARNED_RANGE: frac = (v+1)/2 between log beta~_t (clipped) and log beta_t."""
    nd = v.ndim
    min_log = self._take(self.posterior_log_variance_clipped, t, nd)
    max_log = self._take(self.log_betas, t, nd)
    frac = (v.astype(jnp.float32) + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log

  def p_mean_variance(self, model_out: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                      clip_denoised: bool = False):
    """p(x_{t-1} | x_t) from an (eps, v) model output (B, H, W, 2C).

    Returns (mean, log_variance, pred_x0), each (B, H, W, C), float32.
    """
    c = x_t.shape[-1]
    if model_out.shape[-1] != 2 * c:
      raise ValueError(
          f"model output must have 2*C = {2 * c} channels (eps, v), got {model_out.shape[-1]}")
    model_out = model_out.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    eps, v = model_out[..., :c], model_out[..., c:]
    log_var = self.learned_range_log_variance(v, t)
    pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = self.q_posterior(pred_x0, x_t, t)
    return mean, log_var, pred_x0
