"""Shared pieces of the samplers: input checks, the model call, the scan driver, noise.

Every sampler precomputes its per-step timesteps and coefficients in float64 numpy, casts them
once to float32 arrays, and runs the whole loop as one `jax.lax.scan` (one traced model call, one
compiled loop). The state is float32 whatever the model dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def check_latents(x_T: jnp.ndarray) -> jnp.ndarray:
  """x_T (B, H, W, C) -> float32."""
  if getattr(x_T, "ndim", None) != 4:
    raise ValueError(
        f"x_T must be NHWC latents (B, H, W, C), got shape {getattr(x_T, 'shape', None)}")
  return jnp.asarray(x_T, jnp.float32)


def check_steps(num_steps: int, maximum: int | None = None) -> int:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  if maximum is not None and num_steps > maximum:
    raise ValueError(f"num_steps={num_steps} exceeds the {maximum} training timesteps")
  return int(num_steps)


def f32(a: np.ndarray) -> jnp.ndarray:
  """A float64 numpy table -> float32 jnp array (the one cast)."""
  return jnp.asarray(np.asarray(a, np.float64), jnp.float32)


def call_model(model_fn: ModelFn, x: jnp.ndarray, t: jnp.ndarray,
               channels: int | None) -> jnp.ndarray:
  """model_fn(x, t broadcast to (B,)) in float32; keeps the first `channels` (None: all)."""
  t_b = jnp.broadcast_to(t.astype(jnp.float32), (x.shape[0],))
  out = model_fn(x, t_b)
  if out.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        f"model output {out.shape} does not match the latents {x.shape} (expected (B, H, W, C_out))"
    )
  if channels is not None:
    if out.shape[-1] < channels:
      raise ValueError(f"model output has {out.shape[-1]} channels, need at least {channels}")
    out = out[..., :channels]
  return out.astype(jnp.float32)


def run_scan(step: Callable[[Any, Any], Any], carry: Any, xs: Any, x_T: jnp.ndarray,
             return_trajectory: bool):
  """Runs `carry = step(carry, xs[i])` over the steps; carry[0] is the state x.

  Returns x_final, or (x_final, trajectory (S+1, B, H, W, C)) with trajectory[0] = x_T.
  """
  def body(c, xs_i):
    c = step(c, xs_i)
    return c, (c[0] if return_trajectory else None)

  carry, ys = jax.lax.scan(body, carry, xs)
  if not return_trajectory:
    return carry[0]
  return carry[0], jnp.concatenate([x_T[None], ys], axis=0)


def noise_source(key: jax.Array | None, noise: jnp.ndarray | None, num_steps: int,
                 shape: tuple[int, ...], sampler: str):
  """Per-step noise for stochastic samplers, as scan inputs plus a function that draws step i's.

  `noise` (S, B, H, W, C) is used as given (parity tests); otherwise `key` is split per step.
  """
  if noise is not None:
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape != (num_steps,) + tuple(shape):
      raise ValueError(
          f"{sampler}: noise must have shape {(num_steps,) + tuple(shape)}, got {noise.shape}")
    return noise, lambda n: n
  if key is None:
    raise ValueError(f"{sampler} is stochastic: pass key= (a jax.random key) or noise=")
  keys = jax.random.split(key, num_steps)
  return keys, lambda k: jax.random.normal(k, shape, jnp.float32)


# ---- image-to-image and inpainting (the same for every sampler) ------------------------------------------------
#
# A sampler describes its noise levels as `levels` (S+1, 2) float64: (alpha_i, sigma_i) of the state x_i that
# step i takes (x_i = alpha_i x_0 + sigma_i noise in distribution), levels[S] the level its last step lands on.
#   * image-to-image (SDEdit, Meng et al. 2022): only steps start .. S-1 run, from the image's latents noised to
#     levels[start] with the initial noise x_T (diffusers `scheduler.add_noise(image_latents, noise, timesteps[:1])`
#     in its img2img / inpainting pipelines). With strength 1 the loop starts from x_T itself (diffusers
#     StableDiffusionInpaintPipeline.prepare_latents, `is_strength_max`), so it IS text-to-image.
#   * inpainting: after every step (and at the start) the kept region (mask 0) of the state is replaced by the
#     image's latents noised to the level of that state with the same x_T (after the last step: the image itself),
#     as diffusers' StableDiffusionInpaintPipeline does for a 4-channel UNet after each `scheduler.step`.


@dataclasses.dataclass(frozen=True)
class Known:
  """The image of image-to-image / inpainting, as a sampler takes it.

  latents: (B H W C) float32 clean latents x_0 of the image (VAE-encoded and scaled).
  mask: (B H W 1) latent-resolution mask, 1 = generate, 0 = keep the image there (binary: the kept region is
    taken where mask < 0.5); None: image-to-image only.
  """
  latents: jnp.ndarray
  mask: jnp.ndarray | None = None


def img2img_start(num_steps: int, strength: float) -> int:
  """Index of the first step that runs: diffusers' img2img `get_timesteps` (init_timestep =
  min(int(steps * strength), steps), t_start = steps - init_timestep). num_steps means no step runs."""
  init_timestep = min(int(num_steps * strength), num_steps)
  return max(num_steps - init_timestep, 0)


def check_edit(x_T: jnp.ndarray, strength: float, known: Known | None) -> None:
  """strength in (0, 1]; strength < 1 or a mask needs the image's latents of x_T's shape; mask (B H W 1)."""
  from pixart_jax import checks

  checks.strength("strength", strength)
  if known is None:
    if strength < 1.0:
      raise ValueError(f"strength={strength} < 1 needs the image's latents (known=Known(latents, ...))")
    return
  if tuple(known.latents.shape) != tuple(x_T.shape):
    raise ValueError(f"the image's latents {tuple(known.latents.shape)} must have the shape of x_T "
                     f"{tuple(x_T.shape)} (B H W C)")
  if known.mask is not None and tuple(known.mask.shape) != tuple(x_T.shape[:3]) + (1,):
    raise ValueError(f"the latent mask must have shape {tuple(x_T.shape[:3]) + (1,)} (B H W 1), got "
                     f"{tuple(known.mask.shape)}")


def _noised(known: Known, x_T: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
  return alpha * known.latents.astype(jnp.float32) + sigma * x_T


def _keep(known: Known, x: jnp.ndarray, x_T: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
  """x with its kept region (mask < 0.5) replaced by the image noised to (alpha, sigma)."""
  return jnp.where(known.mask >= 0.5, x, _noised(known, x_T, alpha, sigma))


def start_state(x_T: jnp.ndarray, known: Known | None, strength: float, level: np.ndarray) -> jnp.ndarray:
  """The state the first step that runs takes: x_T (strength 1), else the image noised to `level` (alpha, sigma)
  with x_T; inpainting keeps the image's region noised to `level`."""
  x = x_T
  if strength < 1.0:
    x = _noised(known, x_T, jnp.float32(level[0]), jnp.float32(level[1]))
  if known is not None and known.mask is not None:
    x = _keep(known, x, x_T, jnp.float32(level[0]), jnp.float32(level[1]))
  return x


def run_edit_scan(step: Callable[[Any, Any], Any], carry: Any, xs: Any, x_T: jnp.ndarray, x_start: jnp.ndarray,
                  return_trajectory: bool, known: Known | None, levels_after: np.ndarray):
  """`run_scan` from x_start (carry[0]) that, when inpainting, keeps the image's region after every step.

  x_T: the initial noise (it noises the kept region); levels_after: (S', 2) the (alpha, sigma) each step lands on
  (the last one is replaced by (1, 0): the image itself).
  The trajectory starts at x_start.
  """
  if known is None or known.mask is None:
    return run_scan(step, carry, xs, x_start, return_trajectory)

  levels_after = np.array(levels_after, np.float64)
  levels_after[-1] = (1.0, 0.0)  # after the last step: the image itself (diffusers, whatever sigma it lands on)

  def blended(c, xs_i):
    inner, (a, s) = xs_i
    c = step(c, inner)
    return (_keep(known, c[0], x_T, a, s),) + tuple(c[1:])

  return run_scan(blended, carry, (xs, (f32(levels_after[:, 0]), f32(levels_after[:, 1]))), x_start,
                  return_trajectory)


def no_step_left(known: Known, return_trajectory: bool):
  """A strength so small that no step runs: the image's latents themselves."""
  x = known.latents.astype(jnp.float32)
  return (x, x[None]) if return_trajectory else x
