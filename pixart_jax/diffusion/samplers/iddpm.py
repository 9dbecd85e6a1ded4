"""IDDPM ancestral sampling with learned-range variance on a respaced schedule (docs/ARCHITECTURE.md §6.4).

Official `IDDPM(str(100))` + `p_sample_loop(..., clip_denoised=False)`: the 1000-step process is
respaced to S steps (`space_timesteps`), the network is called with the ORIGINAL timestep of each
kept index (no rescaling), and each step samples
  x_{i-1} = mean(x_i, eps) + [i > 0] exp(0.5 log_var(v)) noise_i,
with mean the posterior mean at the predicted x0 and log_var = frac log beta_i +
(1 - frac) log beta~_i (frac = (v + 1)/2) of the RESPACED betas. The model output must have 2C
channels (eps, v). For the official CFG quirk (guidance on channels [:3] only) build model_fn with
`cfg_model_fn(..., mode="official", guide_channels=3)`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.diffusion.samplers._common import (Known, ModelFn, call_model, check_edit, check_latents,
                                                   check_steps, f32, img2img_start, no_step_left, noise_source,
                                                   run_edit_scan, start_state)


def sample_iddpm(model_fn: ModelFn, x_T: jnp.ndarray, *, num_steps: int = 100, key=None, noise=None,
                 return_trajectory: bool = False, schedule: DiffusionSchedule | None = None,
                 clip_denoised: bool = False, strength: float = 1.0, known: Known | None = None):
  """IDDPM p_sample_loop on `schedule.respace(num_steps)`.

  Args:
    model_fn: model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,2C) = (eps, v); integer t.
    x_T: (B, H, W, C) initial noise.
    num_steps: respaced step count (`space_timesteps(N, num_steps)`).
    key / noise: per-step noise from a jax.random key or given as (S, B, H, W, C); noise[i]
      is used by the i-th step (from the noisiest); the last step adds none.
    return_trajectory: also return (S+1, B, H, W, C), trajectory[0] = x_T.
    schedule: the full training schedule (default linear 1000); it is respaced here.
    clip_denoised: clip the x0 prediction to [-1, 1] (PixArt: False).
    strength / known: image-to-image and inpainting (`_common.Known`): only the steps
      `img2img_start(num_steps, strength)` .. S-1 run (given noise then has one entry per step that runs).
  """
  base = schedule or DiffusionSchedule.linear()
  num_steps = check_steps(num_steps, base.num_timesteps)
  x_T = check_latents(x_T)
  check_edit(x_T, strength, known)
  sp = base.respace(num_steps)
  first = img2img_start(sp.num_timesteps, strength)
  if first == sp.num_timesteps:
    return no_step_left(known, return_trajectory)
  order = np.arange(sp.num_timesteps)[::-1][first:]  # respaced indices, noisiest first (those that run)
  acp = sp.alphas_cumprod
  x_start = start_state(x_T, known, strength, (np.sqrt(acp[order[0]]), np.sqrt(1.0 - acp[order[0]])))
  acp_after = sp.alphas_cumprod_prev[order]  # index k lands on k - 1 (the last on x_0: acp 1)
  nonzero = (order != 0).astype(np.float64)
  # mean = c1 (r x - r1 eps) + c2 x = (c1 r + c2) x - (c1 r1) eps: folded in float64, which
  # avoids the fp32 cancellation of r x - r1 eps (r, r1 ~ 157 at high noise).
  fold_x = sp.posterior_mean_coef1 * sp.sqrt_recip_alphas_cumprod + sp.posterior_mean_coef2
  fold_eps = sp.posterior_mean_coef1 * sp.sqrt_recipm1_alphas_cumprod
  xs_tables = tuple(
      f32(a[order])
      for a in (sp.timestep_map.astype(np.float64), sp.sqrt_recip_alphas_cumprod,
                sp.sqrt_recipm1_alphas_cumprod, sp.posterior_mean_coef1, sp.posterior_mean_coef2,
                fold_x, fold_eps, sp.posterior_log_variance_clipped, sp.log_betas))
  noise_xs, draw = noise_source(key, noise, len(order), x_T.shape, "iddpm")
  c = x_T.shape[-1]

  def step(carry, xs_i):
    (x,) = carry
    t, rec, recm1, pc1, pc2, fx, fe, min_log, max_log, nz_on, nz = xs_i
    out = call_model(model_fn, x, t, None)
    if out.shape[-1] != 2 * c:
      raise ValueError(
          f"iddpm needs a model output with 2*C = {2 * c} channels (eps, v), got {out.shape[-1]}")
    eps, v = out[..., :c], out[..., c:]
    if clip_denoised:
      mean = pc1 * jnp.clip(rec * x - recm1 * eps, -1.0, 1.0) + pc2 * x
    else:
      mean = fx * x - fe * eps
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    return (mean + nz_on * jnp.exp(0.5 * log_var) * draw(nz),)

  xs = xs_tables + (f32(nonzero), noise_xs)
  return run_edit_scan(step, (x_start,), xs, x_T, x_start, return_trajectory, known,
                       np.stack([np.sqrt(acp_after), np.sqrt(1.0 - acp_after)], 1))
