"""The official continuous-time DPM-Solver++ of PixArt-Sigma (docs/ARCHITECTURE.md §6.2).

[PS] `diffusion/model/dpm_solver.py` with `NoiseScheduleVP('discrete', betas)`,
`model_wrapper(model_type='noise')`, `DPM_Solver(algorithm_type='dpmsolver++')` and
`.sample(steps, order=2, skip_type='time_uniform', method='multistep', lower_order_final=True)`:
  * log alpha(t) is the piecewise-linear interpolation of 0.5 cumsum(log(1 - beta)) on
    t_k = k/N (k = 1..N), sigma = sqrt(1 - alpha^2), lambda = log alpha - log sigma;
  * time grid linspace(1, 1/N, S+1) ('time_uniform'; also 'time_quadratic', 'logSNR');
  * the network sees the fractional time (t - 1/N) * 1000 (999, 949.05, ..., 49.95 for S = 20);
  * first step order 1, then multistep order 2 ('dpmsolver' type = midpoint), and with
    lower_order_final the last step is order 1; the last grid point t = 1/N is not evaluated.
Only the first C channels (eps) of the model output are used.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.diffusion.samplers._common import Known, ModelFn, check_latents, check_steps
from pixart_jax.diffusion.samplers.dpm_solver import run_dpmpp_2m

SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")


class NoiseScheduleVP:
  """Official NoiseScheduleVP('discrete') in float64 numpy."""

  def __init__(self, betas: np.ndarray):
    log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
    log_alphas = self._numerical_clip_alpha(log_alphas)
    self.log_alpha_array = log_alphas
    self.total_n = log_alphas.size
    self.t_array = np.linspace(0.0, 1.0, self.total_n + 1)[1:]

  @staticmethod
  def _numerical_clip_alpha(log_alphas: np.ndarray, clipped_lambda: float = -5.1) -> np.ndarray:
    log_sigmas = 0.5 * np.log(1.0 - np.exp(2.0 * log_alphas))
    lambs = log_alphas - log_sigmas
    idx = int(np.searchsorted(lambs[::-1], clipped_lambda))
    return log_alphas[:-idx] if idx > 0 else log_alphas

  def _interp(self, x: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Official `interpolate_fn`: piecewise linear, extended linearly beyond the end points."""
    x = np.asarray(x, np.float64)
    k = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    return yp[k] + (x - xp[k]) * (yp[k + 1] - yp[k]) / (xp[k + 1] - xp[k])

  def marginal_log_mean_coeff(self, t):
    return self._interp(t, self.t_array, self.log_alpha_array)

  def marginal_alpha(self, t):
    return np.exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t):
    return np.sqrt(1.0 - np.exp(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    la = self.marginal_log_mean_coeff(t)
    return la - 0.5 * np.log(1.0 - np.exp(2.0 * la))

  def inverse_lambda(self, lamb):
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lamb, np.float64))
    return self._interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])


def official_time_grid(ns: NoiseScheduleVP, num_steps: int, skip_type: str, t_start: float,
                       t_end: float) -> np.ndarray:
  """`DPM_Solver.get_time_steps`: (S+1,) continuous times from t_start down to t_end."""
  if skip_type == "time_uniform":
    return np.linspace(t_start, t_end, num_steps + 1)
  if skip_type == "time_quadratic":
    return np.linspace(t_start ** 0.5, t_end ** 0.5, num_steps + 1) ** 2
  if skip_type == "logSNR":
    lam = np.linspace(ns.marginal_lambda(t_start), ns.marginal_lambda(t_end), num_steps + 1)
    return ns.inverse_lambda(lam)
  raise ValueError(f"unknown skip_type {skip_type!r}; valid: {', '.join(SKIP_TYPES)}")


def sample_dpm_solver_official(model_fn: ModelFn, x_T: jnp.ndarray, *, num_steps: int = 20,
                               key=None, return_trajectory: bool = False,
                               schedule: DiffusionSchedule | None = None, order: int = 2,
                               skip_type: str = "time_uniform", t_start: float = 1.0,
                               t_end: float | None = None, lower_order_final: bool = True,
                               strength: float = 1.0, known: Known | None = None):
  """Official PixArt DPM-Solver++ multistep sampler.

  Args:
    model_fn: model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,C or 2C); t is the fractional
      network time (t_cont - 1/N) * 1000.
    x_T: (B, H, W, C) initial noise.
    num_steps: number of model evaluations S (>= order).
    key: unused (deterministic).
    return_trajectory: also return (S+1, B, H, W, C) states (trajectory[0] = x_T).
    schedule: the training schedule whose betas define NoiseScheduleVP (default linear 1000).
    order: 1 or 2; skip_type: 'time_uniform' | 'time_quadratic' | 'logSNR';
    t_start / t_end: continuous start / end times (default 1 and 1/N);
    lower_order_final: the last step uses order 1.
    strength / known: image-to-image and inpainting (`_common.Known`): the steps `img2img_start(S, strength)` ..
      S-1 of the grid run, with the multistep warm-up (first order) starting again.
  """
  del key
  schedule = schedule or DiffusionSchedule.linear()
  num_steps = check_steps(num_steps)
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")
  if num_steps < order:
    raise ValueError(f"num_steps ({num_steps}) must be >= order ({order})")
  x_T = check_latents(x_T)
  ns = NoiseScheduleVP(schedule.betas)
  t_end = 1.0 / ns.total_n if t_end is None else float(t_end)
  if not 0.0 < t_end < t_start <= 1.0:
    raise ValueError(f"need 0 < t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
  grid = official_time_grid(ns, num_steps, skip_type, float(t_start), t_end)
  alpha, sigma = ns.marginal_alpha(grid), ns.marginal_std(grid)
  t_model = (grid[:-1] - 1.0 / ns.total_n) * 1000.0
  step_no = np.arange(1, num_steps + 1)  # official step index of the update landing on grid[i+1]
  orders = np.minimum(order, step_no)  # warm-up: the first step is order 1 (run_dpmpp_2m: the first that runs)
  if lower_order_final:
    orders = np.minimum(orders, num_steps + 1 - step_no)
  return run_dpmpp_2m(model_fn, x_T, t_model, alpha, sigma, orders, return_trajectory, strength=strength,
                      known=known)
