"""Small float64 numpy references of the OFFICIAL PixArt-Sigma sampling algorithms (test-only).

Written from the official code ([PS] `diffusion/model/dpm_solver.py`, `gaussian_diffusion.py`,
`respace.py`) as straight-line loops, sharing nothing with `pixart_jax.diffusion`:
  * `official_dpm_solver_pp`: NoiseScheduleVP('discrete') + model_wrapper(model_type='noise')
    + DPM_Solver(algorithm_type='dpmsolver++').sample(method='multistep', solver_type='dpmsolver').
  * `official_iddpm_p_sample_loop`: SpacedDiffusion(space_timesteps(1000, str(S))) with
    LEARNED_RANGE variance, EPSILON mean, p_sample_loop(clip_denoised=False), noise injected.
Arrays are NHWC float64; `model(x, t)` gets t as a (B,) float64 array.
"""
from __future__ import annotations

import numpy as np


# ---------------------------------------------------------------- official DPM-Solver++ ----

class RefNoiseScheduleVP:
  """NoiseScheduleVP(schedule='discrete', betas=betas)."""

  def __init__(self, betas):
    log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
    # numerical_clip_alpha(clipped_lambda=-5.1)
    log_sigmas = 0.5 * np.log(1.0 - np.exp(2.0 * log_alphas))
    lambs = log_alphas - log_sigmas
    idx = int(np.searchsorted(np.flip(lambs), -5.1))
    if idx > 0:
      log_alphas = log_alphas[:-idx]
    self.log_alpha_array = log_alphas
    self.total_N = len(log_alphas)
    self.t_array = np.linspace(0.0, 1.0, self.total_N + 1)[1:]

  @staticmethod
  def interpolate_fn(x, xp, yp):
    """Official interpolate_fn for scalar x (outermost segments extended linearly)."""
    k = len(xp)
    pos = int(np.sum(xp < x))  # where x falls in the sorted keypoints
    if pos == 0:
      i0 = 0
    elif pos == k:
      i0 = k - 2
    else:
      i0 = pos - 1
    return yp[i0] + (x - xp[i0]) * (yp[i0 + 1] - yp[i0]) / (xp[i0 + 1] - xp[i0])

  def marginal_log_mean_coeff(self, t):
    return self.interpolate_fn(t, self.t_array, self.log_alpha_array)

  def marginal_alpha(self, t):
    return np.exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t):
    return np.sqrt(1.0 - np.exp(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    lm = self.marginal_log_mean_coeff(t)
    return lm - 0.5 * np.log(1.0 - np.exp(2.0 * lm))

  def inverse_lambda(self, lamb):
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lamb)
    return self.interpolate_fn(log_alpha, np.flip(self.log_alpha_array), np.flip(self.t_array))


def official_dpm_solver_pp(model, x, betas, steps=20, order=2, skip_type="time_uniform",
                           lower_order_final=True, t_start=None, t_end=None, record_t=None):
  """Returns (x_final, [x_T, x_1, ..., x_S]); `record_t` collects the model input times."""
  ns = RefNoiseScheduleVP(betas)
  x = np.asarray(x, np.float64)

  def model_fn(x, t_cont):  # data prediction of the wrapped noise model
    t_input = (t_cont - 1.0 / ns.total_N) * 1000.0
    if record_t is not None:
      record_t.append(t_input)
    noise = model(x, np.full((x.shape[0],), t_input))
    return (x - ns.marginal_std(t_cont) * noise) / ns.marginal_alpha(t_cont)

  def first_update(x, s, t, model_s):
    h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
    phi_1 = np.expm1(-h)
    return ns.marginal_std(t) / ns.marginal_std(s) * x - ns.marginal_alpha(t) * phi_1 * model_s

  def second_update(x, model_prev_list, t_prev_list, t):
    m1, m0 = model_prev_list[-2], model_prev_list[-1]
    t1, t0 = t_prev_list[-2], t_prev_list[-1]
    l1, l0, lt = ns.marginal_lambda(t1), ns.marginal_lambda(t0), ns.marginal_lambda(t)
    h_0 = l0 - l1
    h = lt - l0
    r0 = h_0 / h
    d1_0 = (1.0 / r0) * (m0 - m1)
    phi_1 = np.expm1(-h)
    alpha_t = ns.marginal_alpha(t)
    return (ns.marginal_std(t) / ns.marginal_std(t0) * x - alpha_t * phi_1 * m0
            - 0.5 * alpha_t * phi_1 * d1_0)

  def update(x, model_prev_list, t_prev_list, t, step_order):
    if step_order == 1:
      return first_update(x, t_prev_list[-1], t, model_prev_list[-1])
    return second_update(x, model_prev_list, t_prev_list, t)

  t_0 = 1.0 / ns.total_N if t_end is None else t_end
  t_T = 1.0 if t_start is None else t_start
  if skip_type == "time_uniform":
    timesteps = np.linspace(t_T, t_0, steps + 1)
  elif skip_type == "time_quadratic":
    timesteps = np.linspace(t_T ** 0.5, t_0 ** 0.5, steps + 1) ** 2
  elif skip_type == "logSNR":
    lam = np.linspace(ns.marginal_lambda(t_T), ns.marginal_lambda(t_0), steps + 1)
    timesteps = np.array([ns.inverse_lambda(v) for v in lam])
  else:
    raise ValueError(skip_type)

  intermediates = [x]
  t = timesteps[0]
  t_prev_list = [t]
  model_prev_list = [model_fn(x, t)]
  for step in range(1, order):
    t = timesteps[step]
    x = update(x, model_prev_list, t_prev_list, t, step)
    intermediates.append(x)
    t_prev_list.append(t)
    model_prev_list.append(model_fn(x, t))
  for step in range(order, steps + 1):
    t = timesteps[step]
    step_order = min(order, steps + 1 - step) if lower_order_final else order
    x = update(x, model_prev_list, t_prev_list, t, step_order)
    intermediates.append(x)
    for i in range(order - 1):
      t_prev_list[i] = t_prev_list[i + 1]
      model_prev_list[i] = model_prev_list[i + 1]
    t_prev_list[-1] = t
    if step < steps:
      model_prev_list[-1] = model_fn(x, t)
  return x, intermediates


# ---------------------------------------------------------------- official IDDPM --------

def space_timesteps_ref(num_timesteps, section_counts):
  """respace.space_timesteps, verbatim logic; returns a set."""
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired_count = int(section_counts[len("ddim"):])
      for i in range(1, num_timesteps):
        if len(range(0, num_timesteps, i)) == desired_count:
          return set(range(0, num_timesteps, i))
      raise ValueError("cannot create exactly that many steps with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError("cannot divide section")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    taken_steps = []
    for _ in range(section_count):
      taken_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    all_steps += taken_steps
    start_idx += size
  return set(all_steps)


class RefGaussianDiffusion:
  """GaussianDiffusion tables (float64), optionally spaced like SpacedDiffusion."""

  def __init__(self, betas, use_timesteps=None):
    betas = np.array(betas, dtype=np.float64)
    self.timestep_map = list(range(len(betas)))
    if use_timesteps is not None:
      base_acp = np.cumprod(1.0 - betas)
      last, new_betas, self.timestep_map = 1.0, [], []
      for i, acp in enumerate(base_acp):
        if i in use_timesteps:
          new_betas.append(1 - acp / last)
          last = acp
          self.timestep_map.append(i)
      betas = np.array(new_betas)
    self.betas = betas
    self.num_timesteps = len(betas)
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    one_minus = 1.0 - self.alphas_cumprod
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
    self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus

  def p_sample(self, model, x, i, noise, clip_denoised=False):
    c = x.shape[-1]
    out = model(x, np.full((x.shape[0],), float(self.timestep_map[i])))  # _WrappedModel: original t
    eps, v = out[..., :c], out[..., c:]
    min_log = self.posterior_log_variance_clipped[i]
    max_log = np.log(self.betas[i])
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    pred_x0 = self.sqrt_recip_alphas_cumprod[i] * x - self.sqrt_recipm1_alphas_cumprod[i] * eps
    if clip_denoised:
      pred_x0 = np.clip(pred_x0, -1, 1)
    mean = self.posterior_mean_coef1[i] * pred_x0 + self.posterior_mean_coef2[i] * x
    nonzero = 1.0 if i != 0 else 0.0
    return mean + nonzero * np.exp(0.5 * log_var) * noise


def official_iddpm_p_sample_loop(model, x, betas, steps, noises, clip_denoised=False):
  """IDDPM(str(steps)).p_sample_loop with injected per-step noise; returns [x_T, ..., x_0]."""
  diff = RefGaussianDiffusion(betas, space_timesteps_ref(len(betas), str(steps)))
  x = np.asarray(x, np.float64)
  traj = [x]
  for k, i in enumerate(range(diff.num_timesteps)[::-1]):
    x = diff.p_sample(model, x, i, noises[k], clip_denoised)
    traj.append(x)
  return traj


# ---------------------------------------------------------------- the test model ----------

def analytic_model(xp, x, t, learn_sigma=False):
  """A fixed, smooth eps-model usable with numpy, torch or jax.numpy (`xp`); elementwise.

  The eps of a denoiser for data N(0, 1/2) with a nonlinear bend: with u(t) = 0.1 s + 9.95 s^2
  (s = t / 1000; a smooth stand-in for -log alphas_cumprod), a = exp(-u/2), sig^2 = 1 - a^2,
    eps(x, t) = sig (x - 0.5 a sin(2x)) / (0.5 a^2 + sig^2).
  eps stays O(1), x0 predictions stay O(1) at every noise level, and the output depends on
  fractional t. With learn_sigma, v(x, t) = 0.8 tanh(x) cos(3 s) is appended on the last
  (channel) axis of NHWC arrays. `t` must broadcast against x.
  """
  s = t / 1000.0
  u = 0.1 * s + 9.95 * s * s
  a = xp.exp(-0.5 * u)
  sig2 = -xp.expm1(-u)
  eps = xp.sqrt(sig2) * (x - 0.5 * a * xp.sin(2.0 * x)) / (0.5 * a * a + sig2)
  if not learn_sigma:
    return eps
  v = 0.8 * xp.tanh(x) * xp.cos(3.0 * s)
  return xp.concatenate([eps, v], axis=-1)
