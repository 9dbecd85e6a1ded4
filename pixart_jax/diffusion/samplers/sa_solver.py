"""SA-Solver (stochastic Adams, data prediction), equivalent to diffusers `SASolverScheduler`.

Config reproduced (PixArt-Sigma demo, docs/ARCHITECTURE.md §6.3): algorithm_type "data_prediction",
predictor_order 2, corrector_order 2, tau(t) = 1 for 200 <= t <= 800 else 0, prediction_type
"epsilon", timestep_spacing "linspace", lower_order_final True, 25 steps. As in diffusers the
last update lands on sigma(t = 0), not on 0.

Each step i (integer timestep t_i, state x_i from the previous predictor):
  1. x0_i = (x_i - sigma_i eps(x_i, t_i)) / alpha_i.
  2. corrector (i >= 1, PEC): x_i <- SA-Corrector(x_{i-1}, noise_{i-1}, x0_i, x0_{i-1}, ...)
     with tau(t_{i-1}) (x0_i is NOT re-evaluated at the corrected x_i).
  3. predictor: x_{i+1} = SA-Predictor(x_i, x0_i, x0_{i-1}, ..., noise_i) with tau(t_i).
The Adams coefficients are Lagrange-weighted integrals of exp((1 + tau^2) lambda) lambda^k,
computed once per step in float64 (including diffusers' order-2 "UniPC-like" modification).
The stochasticity comes from `key` (split per step) or an explicit `noise` (S, B, H, W, C).
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.diffusion.samplers._common import (Known, ModelFn, call_model, check_edit, check_latents,
                                                   check_steps, f32, img2img_start, no_step_left, noise_source,
                                                   run_edit_scan, start_state)
from pixart_jax.diffusion.samplers.dpm_solver import diffusers_timesteps


def default_tau(t: int) -> float:
  """Default tau: 1 for 200 <= t <= 800, else 0 (SDE in the middle, ODE at the ends)."""
  return 1.0 if 200 <= t <= 800 else 0.0


def _exp_integral(k: int, start: float, end: float, tau: float) -> float:
  """Integral over [start, end] of exp((1 + tau^2) x) x^k dx (closed form)."""
  a = 1.0 + tau * tau
  s, e = a * start, a * end

  def poly(y):  # sum_m (-1)^m k!/(k-m)! y^(k-m), so that d/dy[e^y poly(y)] = e^y y^k
    return sum(
        (-1) ** m * math.factorial(k) / math.factorial(k - m) * y ** (k - m) for m in range(k + 1))

  return math.exp(e) * (poly(e) - poly(s) * math.exp(-(e - s))) / a ** (k + 1)


def _adams_coefficients(order: int, start: float, end: float, lambdas: list[float],
                        tau: float) -> list[float]:
  """diffusers `get_coefficients_fn` (data prediction): weights of x0 at nodes `lambdas`."""
  coeffs = []
  for i in range(order):
    others = [lambdas[j] for j in range(order) if j != i]
    if others:
      basis = np.poly(others) / np.prod([lambdas[i] - o for o in others])
    else:
      basis = np.array([1.0])
    # basis[j] multiplies x^(order-1-j)
    coeffs.append(
        sum(basis[j] * _exp_integral(order - 1 - j, start, end, tau) for j in range(order)))
  return coeffs


def _alpha_sigma_lambda(sig_ve: float) -> tuple[float, float, float]:
  alpha = 1.0 / math.sqrt(sig_ve * sig_ve + 1.0)
  sigma = sig_ve * alpha
  return alpha, sigma, math.log(alpha) - math.log(sigma)


def _sa_update(order: int, i_from: int, i_to: int, lam: np.ndarray, sig: np.ndarray, tau: float,
               node_idx: list[int], corrector: bool) -> tuple[float, list[float], float]:
  """Coefficients (x_coef, [x0 weights at node_idx], noise_coef) of one SA update i_from -> i_to."""
  _, s_to, l_to = _alpha_sigma_lambda(sig[i_to])
  _, s_from, l_from = _alpha_sigma_lambda(sig[i_from])
  h = l_to - l_from
  a = 1.0 + tau * tau
  w = _adams_coefficients(order, l_from, l_to, [lam[j] for j in node_idx], tau)
  if order == 2:
    if corrector:
      extra = math.exp(a * l_to) * (h / 2 - (h * a - 1 + math.exp(-a * h)) / (a * a * h))
    else:
      extra = (math.exp(a * l_to) * (h * h / 2 - (h * a - 1 + math.exp(-a * h)) / (a * a))
               / (l_from - lam[i_from - 1]))
    w[0] += extra
    w[1] -= extra
  scale = a * s_to * math.exp(-tau * tau * l_to)
  x_coef = math.exp(-tau * tau * h) * s_to / s_from
  noise_coef = s_to * math.sqrt(1.0 - math.exp(-2.0 * tau * tau * h))
  return x_coef, [scale * wk for wk in w], noise_coef


def sa_solver_tables(timesteps: np.ndarray, sig_ve: np.ndarray, predictor_order: int,
                     corrector_order: int, tau_fn: Callable[[int], float]) -> dict[str, np.ndarray]:
  """Per-step float64 coefficients replaying diffusers' SASolverScheduler.step bookkeeping.

  sig_ve: (S+1,) VE sigmas (the last one is sigma(t=0)). History slot k holds x0_{i-k}.
  """
  steps = len(timesteps)
  hist = max(predictor_order, corrector_order)  # x0_i plus up to hist-1 previous
  lam = np.array([_alpha_sigma_lambda(s)[2] for s in sig_ve])
  out = {
      "p_x": np.zeros(steps),
      "p_w": np.zeros((steps, hist)),
      "p_n": np.zeros(steps),
      "c_on": np.zeros(steps),
      "c_x": np.zeros(steps),
      "c_w": np.zeros((steps, hist)),
      "c_n": np.zeros(steps)
  }
  n_avail = max(predictor_order, corrector_order - 1)
  lower_order_nums, corr_order = 0, None
  for i in range(steps):
    if i > 0:  # corrector of x_i with the order chosen at step i-1 and tau(t_{i-1})
      cx, cw, cn = _sa_update(corr_order, i - 1, i, lam, sig_ve, tau_fn(int(timesteps[i - 1])),
                              [i - k for k in range(corr_order)], corrector=True)
      out["c_on"][i], out["c_x"][i], out["c_n"][i] = 1.0, cx, cn
      out["c_w"][i, :corr_order] = cw
    p_order = min(predictor_order, steps - i, lower_order_nums + 1)
    corr_order = min(corrector_order, steps - i + 1, lower_order_nums + 2)
    px, pw, pn = _sa_update(p_order, i, i + 1, lam, sig_ve, tau_fn(int(timesteps[i])),
                            [i - k for k in range(p_order)], corrector=False)
    out["p_x"][i], out["p_n"][i] = px, pn
    out["p_w"][i, :p_order] = pw
    lower_order_nums = min(lower_order_nums + 1, n_avail)
  return out


def sample_sa_solver(model_fn: ModelFn, x_T: jnp.ndarray, *, num_steps: int = 25, key=None,
                     noise=None, return_trajectory: bool = False,
                     schedule: DiffusionSchedule | None = None, predictor_order: int = 2,
                     corrector_order: int = 2, tau_fn: Callable[[int], float] | None = None,
                     strength: float = 1.0, known: Known | None = None):
  """SA-Solver (diffusers SASolverScheduler, data prediction).

  Args:
    model_fn: model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,C or 2C); integer-valued t.
    x_T: (B, H, W, C) initial noise.
    num_steps: number of model evaluations S.
    key / noise: the per-step noise, from a jax.random key (split per step) or given as
      (S, B, H, W, C); noise[i] is drawn at step i (used by its predictor and the next corrector).
    return_trajectory: also return the predictor states (S+1, B, H, W, C), trajectory[0] = x_T
      (the sequence diffusers' `step` returns).
    schedule: training schedule (default linear 1000).
    predictor_order, corrector_order: 1..3.
    tau_fn: tau(integer timestep) -> float; default 1 on [200, 800] else 0.
    strength / known: image-to-image and inpainting (`_common.Known`): only the steps
      `img2img_start(num_steps, strength)` .. S-1 run, their bookkeeping starting again (no corrector at the
      first, lower orders first) as in diffusers' scheduler after `set_begin_index`; given noise then has one
      entry per step that runs.
  """
  schedule = schedule or DiffusionSchedule.linear()
  n = schedule.num_timesteps
  num_steps = check_steps(num_steps, n)
  for name, o in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
    if o not in (1, 2, 3):
      raise ValueError(f"{name} must be 1, 2 or 3, got {o}")
  x_T = check_latents(x_T)
  check_edit(x_T, strength, known)
  tau_fn = tau_fn or default_tau
  ts = diffusers_timesteps(num_steps, n)
  acp = schedule.alphas_cumprod
  sig_all = np.sqrt((1.0 - acp) / acp)
  sig_ve = np.append(sig_all[ts], sig_all[0])
  first = img2img_start(num_steps, strength)
  if first == num_steps:
    return no_step_left(known, return_trajectory)
  ts, sig_ve, num_steps = ts[first:], sig_ve[first:], num_steps - first
  levels = np.stack([1.0 / np.sqrt(sig_ve ** 2 + 1.0), sig_ve / np.sqrt(sig_ve ** 2 + 1.0)], 1)
  x_start = start_state(x_T, known, strength, levels[0])
  tab = sa_solver_tables(ts, sig_ve, predictor_order, corrector_order, tau_fn)
  alpha = 1.0 / np.sqrt(sig_ve[:-1] ** 2 + 1.0)
  sigma = sig_ve[:-1] * alpha
  hist = tab["p_w"].shape[1]
  noise_xs, draw = noise_source(key, noise, num_steps, x_T.shape, "sa-solver")
  c = x_T.shape[-1]
  xs = (f32(ts.astype(np.float64)), f32(alpha), f32(sigma), f32(tab["p_x"]), f32(tab["p_w"]),
        f32(tab["p_n"]), jnp.asarray(tab["c_on"] > 0), f32(tab["c_x"]), f32(tab["c_w"]),
        f32(tab["c_n"]), noise_xs)

  def step(carry, xs_i):
    x, x_last, noise_last, past = carry  # past: (hist-1, B, H, W, C) = x0_{i-1}, x0_{i-2}, ...
    t, a_s, s_s, p_x, p_w, p_n, c_on, c_x, c_w, c_n, nz = xs_i
    eps = call_model(model_fn, x, t, c)
    x0 = (x - s_s * eps) / a_s
    nodes = [x0] + [past[k] for k in range(hist - 1)]
    corrected = c_x * x_last + sum(c_w[k] * nodes[k] for k in range(hist)) + c_n * noise_last
    x = jnp.where(c_on, corrected, x)
    nz = draw(nz)
    x_next = p_x * x + sum(p_w[k] * nodes[k] for k in range(hist)) + p_n * nz
    new_past = jnp.concatenate([x0[None], past[:-1]], axis=0) if hist > 1 else past
    return x_next, x, nz, new_past

  past0 = jnp.zeros((max(hist - 1, 1),) + x_T.shape, jnp.float32)
  carry = (x_start, jnp.zeros_like(x_T), jnp.zeros_like(x_T), past0)
  return run_edit_scan(step, carry, xs, x_T, x_start, return_trajectory, known, levels[1:])
