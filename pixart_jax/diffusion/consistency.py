"""The arithmetic of latent consistency distillation (LCD), as PixArt-LCM trains it (official
`train_scripts/train_pixart_lcm.py`, after diffusers `examples/consistency_distillation/train_lcm_distill_sd_wds.py`;
Luo et al. 2023, "Latent Consistency Models", arXiv 2310.04378, Algorithm 1).

Axis legend: B batch, H W latent height/width, C latent channels. Everything here is float32 (tables float64 numpy).

Skipping-step schedule: the teacher's ODE solver takes one DDIM step of k = N // n_ddim timesteps on the grid
t_j = k (j + 1) - 1 (j = 0 .. n_ddim - 1; `samplers.lcm.lcm_origin_timesteps`, the same grid the LCM sampler
draws from). One training example draws j ~ U{0 .. n_ddim - 1} and uses

  start t_{n+k} = t_j,  end t_n = max(t_j - k, 0)
  x_{t_{n+k}} = q_sample(x0, t_{n+k}, noise)
  student     f(x_{t_{n+k}}, t_{n+k})                         (gradients)
  teacher     eps_g = eps_u + s (eps_c - eps_u)                 (classifier-free guidance, scale s)
              x_{t_n} = sqrt(acp_prev_j) x0(eps_g) + sqrt(1 - acp_prev_j) eps_g     (DDIM step, eta 0)
  target      f_target(x_{t_n}, t_n)                           (EMA network, stop-gradient)
  loss        d(student, target): L2 (mean square) or pseudo-Huber sqrt(d^2 + c^2) - c, mean over H W C

with acp_prev_j = acp[t_{j-1}] (acp[0] for j = 0) and f(x, t) = c_skip(t) x + c_out(t) x0(eps(x, t)) the boundary
condition parametrisation (`samplers.lcm.boundary_scalings`, timestep_scaling 10: f(x, 0) = x).

Guidance: the official code writes the teacher's guidance in the LCM form c + w (c - u); that is the usual CFG
scale s = w + 1 (PixArt-LCM: w = 4.5, i.e. s = 5.5). Here `guidance` is s, the scale `sample --guidance` takes.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pixart_jax.diffusion.samplers.lcm import boundary_scalings, lcm_origin_timesteps
from pixart_jax.diffusion.schedule import DiffusionSchedule

LOSSES = ("huber", "l2")


@dataclasses.dataclass(frozen=True)
class LcmConfig:
  """guidance: the teacher's CFG scale s (fixed; PixArt-LCM: 5.5). num_ddim_timesteps: the skipping-step grid
  (50; the LCM sampler's `original_inference_steps` must be the same). loss: "huber" (pseudo-Huber, c = huber_c,
  PixArt-LCM's choice) or "l2". timestep_scaling: the boundary scalings' (10)."""
  guidance: float = 5.5
  num_ddim_timesteps: int = 50
  loss: str = "huber"
  huber_c: float = 0.001
  timestep_scaling: float = 10.0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"distill.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
    if not np.isfinite(self.guidance) or self.guidance < 1.0:
      raise ValueError(f"distill.guidance must be a finite CFG scale >= 1, got {self.guidance}")
    if not (np.isfinite(self.huber_c) and self.huber_c > 0):
      raise ValueError(f"distill.huber_c must be > 0, got {self.huber_c}")
    if not (np.isfinite(self.timestep_scaling) and self.timestep_scaling > 0):
      raise ValueError(f"distill.timestep_scaling must be > 0, got {self.timestep_scaling}")


@dataclasses.dataclass(frozen=True)
class SolverTables:
  """The skipping-step grid of a schedule (float64 / int64 numpy, length n_ddim), as the official `DDIMSolver`.

  start: t_j (int64). end: max(t_j - k, 0). prev: acp_prev_j = acp[t_{j-1}], acp[0] for j = 0 (= acp[end]).
  sa_* = sqrt(acp), s1m_* = sqrt(1 - acp) at start / prev / end, computed in float64 (1 - acp near t = 0 loses
  most of its digits in float32). c_skip_*, c_out_*: the boundary scalings at start and end."""
  start: np.ndarray
  end: np.ndarray
  sa_start: np.ndarray
  s1m_start: np.ndarray
  sa_prev: np.ndarray
  s1m_prev: np.ndarray
  sa_end: np.ndarray
  s1m_end: np.ndarray
  c_skip_start: np.ndarray
  c_out_start: np.ndarray
  c_skip_end: np.ndarray
  c_out_end: np.ndarray

  @classmethod
  def build(cls, schedule: DiffusionSchedule, num_ddim_timesteps: int, timestep_scaling: float = 10.0):
    n = schedule.num_timesteps
    start = lcm_origin_timesteps(num_ddim_timesteps, n)
    k = n // num_ddim_timesteps
    end = np.maximum(start - k, 0)
    acp = schedule.alphas_cumprod
    prev = np.concatenate([acp[:1], acp[start[:-1]]])
    cs_s, co_s = boundary_scalings(start, timestep_scaling)
    cs_e, co_e = boundary_scalings(end, timestep_scaling)
    r = lambda a: (np.sqrt(a), np.sqrt(1.0 - a))  # noqa: E731
    return cls(start, end, *r(acp[start]), *r(prev), *r(acp[end]), cs_s, co_s, cs_e, co_e)

  def take(self, name: str, index: jnp.ndarray, ndim: int = 4) -> jnp.ndarray:
    """table[index] as float32 (B, 1, ..., 1) (`ndim` dims) for the (B,) int index."""
    v = jnp.asarray(getattr(self, name), jnp.float32)[index]
    return v.reshape(v.shape + (1,) * (ndim - 1))


def x0_from_eps(x: jnp.ndarray, eps: jnp.ndarray, sa: jnp.ndarray, s1m: jnp.ndarray) -> jnp.ndarray:
  """(x - sqrt(1 - acp) eps) / sqrt(acp); sa = sqrt(acp), s1m = sqrt(1 - acp) broadcast (B 1 1 1)."""
  return (x - s1m * eps) / sa


def consistency(x: jnp.ndarray, eps: jnp.ndarray, sa: jnp.ndarray, s1m: jnp.ndarray, c_skip: jnp.ndarray,
                c_out: jnp.ndarray) -> jnp.ndarray:
  """f(x, t) = c_skip x + c_out x0(eps) (B H W C)."""
  return c_skip * x + c_out * x0_from_eps(x, eps, sa, s1m)


def ddim_step(x: jnp.ndarray, eps: jnp.ndarray, sa: jnp.ndarray, s1m: jnp.ndarray, sa_prev: jnp.ndarray,
              s1m_prev: jnp.ndarray) -> jnp.ndarray:
  """One deterministic DDIM step from x_t (sa, s1m) to acp_prev with the (guided) eps: sqrt(acp_prev) x0 +
  sqrt(1 - acp_prev) eps (official `DDIMSolver.ddim_step`)."""
  return sa_prev * x0_from_eps(x, eps, sa, s1m) + s1m_prev * eps


def distance(pred: jnp.ndarray, target: jnp.ndarray, loss: str, huber_c: float) -> jnp.ndarray:
  """Per-example consistency loss (B,): the mean over H W C of (pred - target)^2 ("l2") or of
  sqrt((pred - target)^2 + c^2) - c ("huber"). The official batch loss is the mean of these."""
  d2 = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  per = d2 if loss == "l2" else jnp.sqrt(d2 + huber_c ** 2) - huber_c
  return jnp.mean(per, axis=tuple(range(1, per.ndim)))
