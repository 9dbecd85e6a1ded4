"""Samplers over NHWC latents; each runs its whole loop as one `lax.scan` (one compiled program).

Interface: `sample_xxx(model_fn, x_T, *, num_steps, key=None, return_trajectory=False, strength=1.0, known=None,
...)`,
with `model_fn(x (B,H,W,C) f32, t (B,) f32) -> (B,H,W,C or 2C)` already including guidance
(see `pixart_jax.diffusion.guidance.cfg_model_fn`). Returns x_0, or (x_0, trajectory
(S+1, B, H, W, C)). `strength` < 1 (image-to-image) and `known` (`Known`: the image's latents and an inpainting
mask) start and steer the loop the same way for every sampler (`_common.py`).
"""
from __future__ import annotations

from pixart_jax.diffusion.samplers._common import Known, img2img_start
from pixart_jax.diffusion.samplers.ddim import sample_ddim
from pixart_jax.diffusion.samplers.dpm_solver import sample_dpm_solver
from pixart_jax.diffusion.samplers.dpm_solver_official import sample_dpm_solver_official
from pixart_jax.diffusion.samplers.iddpm import sample_iddpm
from pixart_jax.diffusion.samplers.lcm import sample_lcm
from pixart_jax.diffusion.samplers.sa_solver import sample_sa_solver

SAMPLERS = {
    "dpm-solver": sample_dpm_solver,
    "dpm-solver-official": sample_dpm_solver_official,
    "sa-solver": sample_sa_solver,
    "iddpm": sample_iddpm,
    "ddim": sample_ddim,
    "lcm": sample_lcm,  # for consistency-distilled models only (PixArt-LCM, our distilled students)
}

DEFAULT_STEPS = {
    "dpm-solver": 20,
    "dpm-solver-official": 20,
    "sa-solver": 25,
    "iddpm": 100,
    "ddim": 50,
    "lcm": 4,
}


def sample(name: str, model_fn, x_T, num_steps: int | None = None, key=None, **kw):
  """Runs sampler `name` (a key of SAMPLERS) with DEFAULT_STEPS[name] unless num_steps is given."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
  steps = DEFAULT_STEPS[name] if num_steps is None else num_steps
  return SAMPLERS[name](model_fn, x_T, num_steps=steps, key=key, **kw)


__all__ = ["Known", "img2img_start", "SAMPLERS", "DEFAULT_STEPS", "sample", "sample_ddim", "sample_dpm_solver",
           "sample_dpm_solver_official", "sample_iddpm", "sample_lcm", "sample_sa_solver"]
