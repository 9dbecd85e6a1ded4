"""Latent-consistency multistep sampling, equivalent to diffusers `LCMScheduler` step by step.

A consistency model f(x_t, t) maps any point of a trajectory to its origin. With an eps-predicting network
(PixArt-LCM, and the students of `pixart_jax.train` distillation) it is parametrised with the boundary condition
of Song et al. 2023 (Consistency Models, §3) as in LCM (Luo et al. 2023, arXiv 2310.04378, Eq. 9):

  x0_hat   = (x_t - sqrt(1 - acp_t) eps(x_t, t)) / sqrt(acp_t)
  f(x_t,t) = c_skip(t) x_t + c_out(t) x0_hat,
  c_skip   = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2),  sd = 0.5, s = timestep_scaling (10)

Multistep sampling (LCM Algorithm 3): x <- f(x, t_i); unless it is the last step, re-noise it to the next
timestep, x <- sqrt(acp_{t_{i+1}}) x + sqrt(1 - acp_{t_{i+1}}) z. The timesteps are diffusers'
`LCMScheduler.set_timesteps`: the distillation grid t = k j - 1 (j = 1 .. original_inference_steps,
k = N // original_inference_steps), reversed, then `num_steps` of them at evenly spaced indices
(for 4 of 50: 999, 759, 499, 259).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.diffusion.samplers._common import (Known, ModelFn, call_model, check_edit, check_latents,
                                                   check_steps, f32, no_step_left, noise_source, run_edit_scan,
                                                   start_state)

SIGMA_DATA = 0.5


def lcm_origin_timesteps(original_inference_steps: int, num_train_timesteps: int,
                         strength: float = 1.0) -> np.ndarray:
  """The distillation (skipping-step) grid, ascending: k j - 1 for j = 1 .. int(original_steps * strength)."""
  if not 1 <= original_inference_steps <= num_train_timesteps:
    raise ValueError(f"original_inference_steps must lie in [1, {num_train_timesteps}], "
                     f"got {original_inference_steps}")
  k = num_train_timesteps // original_inference_steps
  return np.arange(1, int(original_inference_steps * strength) + 1, dtype=np.int64) * k - 1


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_inference_steps: int = 50,
                  strength: float = 1.0) -> np.ndarray:
  """diffusers `LCMScheduler.set_timesteps(num_steps, original_inference_steps=..., strength=...)` (int64,
  descending)."""
  origin = lcm_origin_timesteps(original_inference_steps, num_train_timesteps, strength)
  if num_steps > len(origin):
    raise ValueError(f"num_steps={num_steps} exceeds the {len(origin)} timesteps of the distillation grid "
                     f"(original_inference_steps={original_inference_steps} x strength={strength})")
  origin = origin[::-1]
  idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
  return origin[idx]


def boundary_scalings(t: np.ndarray, timestep_scaling: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
  """(c_skip, c_out) of the consistency boundary condition at integer timesteps t (float64)."""
  s = np.asarray(t, np.float64) * timestep_scaling
  return SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2), s / np.sqrt(s ** 2 + SIGMA_DATA ** 2)


def sample_lcm(model_fn: ModelFn, x_T: jnp.ndarray, *, num_steps: int = 4, key=None, noise=None,
               return_trajectory: bool = False, schedule: DiffusionSchedule | None = None,
               original_inference_steps: int = 50, timestep_scaling: float = 10.0, strength: float = 1.0,
               known: Known | None = None):
  """LCM multistep sampling (diffusers LCMScheduler semantics: epsilon prediction, set_alpha_to_one).

  Args:
    model_fn: model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,C or 2C); integer t; eps = [..., :C] (a learned
      sigma half is ignored, as diffusers' PixArt pipelines do).
    x_T: (B, H, W, C) initial noise.
    num_steps: model evaluations S (1 .. original_inference_steps).
    key / noise: the re-noising between steps (S - 1 draws are used): a key, or (S, B, H, W, C) given noise
      whose last entry is unused. Not needed for one step.
    return_trajectory: also return (S+1, B, H, W, C), trajectory[0] = x_T.
    schedule: training schedule (default: PixArt's linear 1000).
    original_inference_steps, timestep_scaling: as in diffusers (50 and 10: PixArt-LCM's scheduler config).
    strength / known: image-to-image and inpainting (`_common.Known`). As diffusers'
      LatentConsistencyModelImg2ImgPipeline: the timesteps are `set_timesteps(S, strength=strength)` (the
      distillation grid cut to its first int(original_inference_steps * strength) entries), all S of them run.
      Where that grid holds fewer than S timesteps, all of them run (diffusers refuses), none: the image returns.
  """
  schedule = schedule or DiffusionSchedule.linear()
  n = schedule.num_timesteps
  num_steps = check_steps(num_steps, n)
  x_T = check_latents(x_T)
  check_edit(x_T, strength, known)
  if strength < 1.0:
    num_steps = min(num_steps, len(lcm_origin_timesteps(original_inference_steps, n, strength)))
  if num_steps == 0:
    return no_step_left(known, return_trajectory)
  ts = lcm_timesteps(num_steps, n, original_inference_steps, strength)
  acp = schedule.alphas_cumprod
  acp_t = acp[ts]
  acp_next = np.append(acp[ts[1:]], 1.0)  # the last step keeps the denoised sample (no re-noising)
  x_start = start_state(x_T, known, strength, (np.sqrt(acp_t[0]), np.sqrt(1.0 - acp_t[0])))
  c_skip, c_out = boundary_scalings(ts, timestep_scaling)
  xs = (f32(ts.astype(np.float64)), f32(np.sqrt(1.0 - acp_t)), f32(np.sqrt(acp_t)), f32(c_skip), f32(c_out),
        f32(np.sqrt(acp_next)), f32(np.sqrt(1.0 - acp_next)))
  stochastic = num_steps > 1
  if stochastic:
    noise_xs, draw = noise_source(key, noise, num_steps, x_T.shape, "lcm with more than one step")
    xs = xs + (noise_xs,)
  c = x_T.shape[-1]

  def step(carry, xs_i):
    (x,) = carry
    t, sq_1m, sq_a, skip, out, sq_next, sq_1m_next = xs_i[:7]
    eps = call_model(model_fn, x, t, c)
    denoised = out * ((x - sq_1m * eps) / sq_a) + skip * x
    if not stochastic:
      return (denoised,)
    return (sq_next * denoised + sq_1m_next * draw(xs_i[7]),)

  return run_edit_scan(step, (x_start,), xs, x_T, x_start, return_trajectory, known,
                       np.stack([np.sqrt(acp_next), np.sqrt(1.0 - acp_next)], 1))
