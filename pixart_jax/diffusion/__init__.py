"""Diffusion process, IDDPM training loss, classifier-free guidance and samplers.

Model-independent: samplers take any `model_fn(x, t)`.
"""
from pixart_jax.diffusion.guidance import cfg_model_fn
from pixart_jax.diffusion.losses import iddpm_loss
from pixart_jax.diffusion.samplers import DEFAULT_STEPS, SAMPLERS, sample
from pixart_jax.diffusion.schedule import DiffusionSchedule, space_timesteps

__all__ = ["DiffusionSchedule", "space_timesteps", "iddpm_loss", "cfg_model_fn", "SAMPLERS",
           "DEFAULT_STEPS", "sample"]
