"""DDIM, equivalent to diffusers `DDIMScheduler` step by step (docs/ARCHITECTURE.md §6.5).

Our default config (diffusers names): linear betas 1e-4 -> 0.02 over 1000 steps,
prediction_type "epsilon", clip_sample False (PixArt latents are not in [-1, 1]; diffusers'
default True would clip x0 and degrade latents), thresholding False, timestep_spacing
"trailing" (999, 979, ..., 19 for 50 steps: starts at the last training step and the
prev_timestep = t - N // S rule stays on the grid), set_alpha_to_one True (the last step returns
the x0 prediction), steps_offset 0. "leading" / "linspace" spacing and set_alpha_to_one False
reproduce the other diffusers configurations (note that diffusers always steps to
prev_t = t - N // S, also with "linspace").

  x0 = (x - sqrt(1 - acp_t) eps) / sqrt(acp_t)
  std = eta sqrt((1 - acp_prev)/(1 - acp_t) (1 - acp_t/acp_prev))
  x_prev = sqrt(acp_prev) x0 + sqrt(1 - acp_prev - std^2) eps + std noise
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.diffusion.samplers._common import (Known, ModelFn, call_model, check_edit, check_latents,
                                                   check_steps, f32, img2img_start, no_step_left, noise_source,
                                                   run_edit_scan, start_state)

SPACINGS = ("trailing", "leading", "linspace")


def ddim_timesteps(num_steps: int, num_train_timesteps: int, spacing: str,
                   steps_offset: int = 0) -> np.ndarray:
  """diffusers DDIMScheduler.set_timesteps (int64, descending)."""
  n = num_train_timesteps
  if spacing == "linspace":
    return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
  if spacing == "leading":
    return (np.arange(0, num_steps) *
            (n // num_steps)).round()[::-1].astype(np.int64) + steps_offset
  if spacing == "trailing":
    return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
  raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(SPACINGS)}")


def sample_ddim(model_fn: ModelFn, x_T: jnp.ndarray, *, num_steps: int = 50, key=None, noise=None,
                eta: float = 0.0, return_trajectory: bool = False,
                schedule: DiffusionSchedule | None = None, timestep_spacing: str = "trailing",
                set_alpha_to_one: bool = True, steps_offset: int = 0, strength: float = 1.0,
                known: Known | None = None):
  """DDIM sampling (diffusers DDIMScheduler semantics, clip_sample False).

  Args:
    model_fn: model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,C or 2C); integer t; eps = [..., :C].
    x_T: (B, H, W, C) initial noise.
    num_steps: number of model evaluations S (<= N).
    key / noise: only for eta > 0: per-step noise from a key or given as (S, B, H, W, C).
    eta: 0 = deterministic DDIM, 1 = DDPM-like variance.
    return_trajectory: also return (S+1, B, H, W, C), trajectory[0] = x_T.
    schedule: training schedule (default linear 1000).
    timestep_spacing, set_alpha_to_one, steps_offset: as in diffusers (see module docstring).
    strength / known: image-to-image and inpainting (`_common.Known`): only the steps
      `img2img_start(num_steps, strength)` .. S-1 run (given noise then has one entry per step that runs).
  """
  schedule = schedule or DiffusionSchedule.linear()
  n = schedule.num_timesteps
  num_steps = check_steps(num_steps, n)
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  x_T = check_latents(x_T)
  check_edit(x_T, strength, known)
  ts = ddim_timesteps(num_steps, n, timestep_spacing, steps_offset)
  if ts.max() >= n or ts.min() < 0:
    raise ValueError(f"timesteps {ts.min()}..{ts.max()} fall outside [0, {n}) (check steps_offset)")
  acp = schedule.alphas_cumprod
  final = 1.0 if set_alpha_to_one else acp[0]
  prev = ts - n // num_steps
  acp_t = acp[ts]
  acp_prev = np.where(prev >= 0, acp[np.clip(prev, 0, n - 1)], final)
  var = (1.0 - acp_prev) / (1.0 - acp_t) * (1.0 - acp_t / acp_prev)
  std = eta * np.sqrt(var)
  level_at = np.stack([np.sqrt(acp_t), np.sqrt(1.0 - acp_t)], 1)  # the state step i takes
  level_after = np.stack([np.sqrt(acp_prev), np.sqrt(1.0 - acp_prev)], 1)  # the state step i lands on
  first = img2img_start(num_steps, strength)
  if first == num_steps:
    return no_step_left(known, return_trajectory)
  x_start = start_state(x_T, known, strength, level_at[first])
  run = slice(first, None)
  xs = (f32(ts[run].astype(np.float64)), f32(np.sqrt(1.0 - acp_t[run])), f32(np.sqrt(acp_t[run])),
        f32(np.sqrt(acp_prev[run])), f32(np.sqrt(1.0 - acp_prev[run] - std[run] ** 2)), f32(std[run]))
  stochastic = eta > 0
  if stochastic:
    noise_xs, draw = noise_source(key, noise, num_steps - first, x_T.shape, "ddim with eta > 0")
    xs = xs + (noise_xs,)
  c = x_T.shape[-1]

  def step(carry, xs_i):
    (x,) = carry
    t, sq_1m, sq_a, sq_prev, dir_coef, sd = xs_i[:6]
    eps = call_model(model_fn, x, t, c)
    x0 = (x - sq_1m * eps) / sq_a
    x_prev = sq_prev * x0 + dir_coef * eps
    if stochastic:
      x_prev = x_prev + sd * draw(xs_i[6])
    return (x_prev,)

  return run_edit_scan(step, (x_start,), xs, x_T, x_start, return_trajectory, known, level_after[first:])
