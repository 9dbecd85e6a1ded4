"""DPM-Solver++(2M), equivalent to diffusers `DPMSolverMultistepScheduler` as PixArt-Sigma ships it.

Config reproduced (docs/ARCHITECTURE.md §6.1): algorithm_type "dpmsolver++", solver_order 2, solver_type
"midpoint", lower_order_final True, euler_at_final False, prediction_type "epsilon",
timestep_spacing "linspace", steps_offset 0, final_sigmas_type "zero", no thresholding, no
Karras / Lu sigmas. With 20 steps the model sees the integer timesteps 999, 949, ..., 50 and the
last (first-order) update goes to sigma = 0, i.e. returns the last x0 prediction. Only the first
C channels (eps) of the model output are used.

Per step i (data prediction x0_i = (x_i - sigma_i eps_i) / alpha_i, lambda = log alpha - log sigma,
h = lambda_{i+1} - lambda_i):
  order 1 (first and last step):  x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1}(e^{-h}-1) x0_i
  order 2 (midpoint):             ... - 0.5 alpha_{i+1}(e^{-h}-1) (x0_i - x0_{i-1}) / r0,
                                  r0 = (lambda_i - lambda_{i-1}) / h.
The tables come from the float64 schedule (diffusers builds its own in float32; the two differ by
< 4e-7 relative).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.diffusion.samplers._common import (Known, ModelFn, call_model, check_edit, check_latents,
                                                   check_steps, f32, img2img_start, no_step_left, run_edit_scan,
                                                   start_state)


def dpmpp_2m_coefficients(alpha: np.ndarray, sigma: np.ndarray,
                          orders: np.ndarray) -> dict[str, np.ndarray]:
  """Multistep DPM-Solver++ (midpoint / official 'dpmsolver' type) coefficients, float64.

  alpha, sigma: (S+1,) VP alpha_t, sigma_t of the grid points (sigma[-1] may be 0);
  orders: (S,) step orders in {1, 2} (order 2 needs a previous step).
  Returns per-step arrays (S,): x_coef, d0_coef, d1_coef with
    x_{i+1} = x_coef x_i - d0_coef x0_i - d1_coef (x0_i - x0_{i-1}).
  """
  alpha = np.asarray(alpha, np.float64)
  sigma = np.asarray(sigma, np.float64)
  steps = len(orders)
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)  # +inf where sigma == 0
  x_coef = np.zeros(steps)
  d0_coef = np.zeros(steps)
  d1_coef = np.zeros(steps)
  for i in range(steps):
    if sigma[i + 1] == 0.0:  # final step to sigma = 0: exp(-h) = 0, result is x0_i
      x_coef[i], phi = 0.0, -1.0
    else:
      h = lam[i + 1] - lam[i]
      x_coef[i], phi = sigma[i + 1] / sigma[i], np.expm1(-h)
    d0_coef[i] = alpha[i + 1] * phi
    if orders[i] == 2:
      if i == 0:
        raise ValueError("a second-order step needs a previous step")
      if sigma[i + 1] != 0.0:
        r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
        d1_coef[i] = 0.5 * d0_coef[i] / r0
      # With sigma_{i+1} = 0, h = inf and r0 = 0 * ... -> the D1 term vanishes (lim 0.5*phi/r0 = 0).
    elif orders[i] != 1:
      raise ValueError(f"step orders must be 1 or 2, got {orders[i]}")
  return {"x_coef": x_coef, "d0_coef": d0_coef, "d1_coef": d1_coef}


def run_dpmpp_2m(model_fn: ModelFn, x_T: jnp.ndarray, t_model: np.ndarray, alpha: np.ndarray,
                 sigma: np.ndarray, orders: np.ndarray, return_trajectory: bool, *, strength: float = 1.0,
                 known: Known | None = None):
  """The jitted-friendly multistep loop shared by the diffusers and the official DPM-Solver++.

  t_model: (S,) model time of each evaluation; alpha, sigma: (S+1,) grid; orders: (S,) of the full run.
  strength / known: image-to-image and inpainting (`_common.Known`): the steps `img2img_start(S, strength)` ..
  S-1 run on the rest of the grid, the multistep warm-up starting again (first order, as diffusers'
  scheduler does after `set_begin_index`: its `lower_order_nums` starts at 0).
  """
  check_edit(x_T, strength, known)
  steps = len(orders)
  first = img2img_start(steps, strength)
  if first == steps:
    return no_step_left(known, return_trajectory)
  x_start = start_state(x_T, known, strength, (alpha[first], sigma[first]))
  if first:
    t_model, alpha, sigma = t_model[first:], alpha[first:], sigma[first:]
    orders = np.array(orders[first:])
    orders[0] = 1
  c = x_T.shape[-1]
  coef = dpmpp_2m_coefficients(alpha, sigma, orders)
  xs = (f32(t_model), f32(alpha[:-1]), f32(sigma[:-1]), f32(coef["x_coef"]), f32(coef["d0_coef"]),
        f32(coef["d1_coef"]))

  def step(carry, xs_i):
    x, x0_prev = carry
    t, a_s, s_s, cx, c0, c1 = xs_i
    eps = call_model(model_fn, x, t, c)
    x0 = (x - s_s * eps) / a_s
    x_next = cx * x - c0 * x0 - c1 * (x0 - x0_prev)
    return x_next, x0

  return run_edit_scan(step, (x_start, jnp.zeros_like(x_T)), xs, x_T, x_start, return_trajectory, known,
                       np.stack([alpha[1:], sigma[1:]], 1))


def diffusers_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
  """diffusers `timestep_spacing="linspace"`: linspace(0, T-1, S+1).round()[::-1][:-1] (int64)."""
  return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def sample_dpm_solver(model_fn: ModelFn, x_T: jnp.ndarray, *, num_steps: int = 20, key=None,
                      return_trajectory: bool = False, schedule: DiffusionSchedule | None = None,
                      order: int = 2, strength: float = 1.0, known: Known | None = None):
  """DPM-Solver++(2M) as diffusers runs it for PixArt-Sigma (the default sampler).

  Args:
    model_fn: model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,C or 2C), guidance included;
      called with integer-valued t.
    x_T: (B, H, W, C) initial noise (init_noise_sigma is 1).
    num_steps: number of model evaluations (<= N).
    key: unused (deterministic); accepted for a uniform sampler interface.
    return_trajectory: also return the states (S+1, B, H, W, C), trajectory[0] = x_T.
    schedule: the training schedule (default linear 1000 steps).
    order: 2 (midpoint multistep) or 1 (DDIM-like first order).
    strength / known: image-to-image and inpainting (`_common.Known`, `run_dpmpp_2m`).
  """
  del key
  schedule = schedule or DiffusionSchedule.linear()
  n = schedule.num_timesteps
  num_steps = check_steps(num_steps, n)
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")
  x_T = check_latents(x_T)
  ts = diffusers_timesteps(num_steps, n)
  acp = schedule.alphas_cumprod[ts]
  sig_ve = np.append(np.sqrt((1.0 - acp) / acp), 0.0)
  alpha = 1.0 / np.sqrt(sig_ve ** 2 + 1.0)
  sigma = sig_ve * alpha
  orders = np.full(num_steps, order)
  orders[0] = 1
  orders[-1] = 1  # final_sigmas_type "zero" always ends with a first-order step
  return run_dpmpp_2m(model_fn, x_T, ts.astype(np.float64), alpha, sigma, orders, return_trajectory,
                      strength=strength, known=known)
