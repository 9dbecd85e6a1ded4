"""The IDDPM training loss of PixArt-Sigma (docs/ARCHITECTURE.md §4.2): MSE on eps + variational bound on v.

Official `GaussianDiffusion.training_losses` with learn_sigma (LEARNED_RANGE), EPSILON mean type,
loss type MSE:
  mse = mean over (H, W, C) of (noise - eps_hat)^2
  vb  = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits, computed with eps_hat under
        stop_gradient so that it only trains the variance channels; at t = 0 the discretized
        Gaussian decoder NLL (bits) replaces the KL.
  loss = mse + vb  (per sample; the batch loss is its mean).
All arithmetic in float32 whatever the model dtype. Arrays are NHWC.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pixart_jax.diffusion.schedule import DiffusionSchedule

_LN2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise (nats).

  = 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)),
  with -1 + exp(d) written as expm1(d): the variances nearly agree at large t, and this avoids
  most of the float32 cancellation there.
  """
  d = logvar1 - logvar2
  return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by IDDPM."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood (nats, elementwise) of x in [-1, 1] discretized to 256 bins (IDDPM)."""
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def iddpm_loss(model_output: jnp.ndarray, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
               noise: jnp.ndarray, *, schedule: DiffusionSchedule | None = None,
               learn_sigma: bool = True) -> dict[str, jnp.ndarray]:
  """Per-sample IDDPM loss.

  Args:
    model_output: (B, H, W, 2C) = (eps_hat, v) when learn_sigma, else (B, H, W, C) or more
      channels of which the first C are eps_hat (the variance head is then not trained).
    x0: (B, H, W, C) clean latents; x_t: (B, H, W, C) = schedule.q_sample(x0, t, noise).
    t: (B,) int timesteps in [0, N); noise: (B, H, W, C).
    schedule: the diffusion process (default: the 1000-step linear PixArt schedule).
  Returns:
    {"loss": (B,), "mse": (B,), "vb": (B,)} float32; vb is zeros when not learn_sigma.
  """
  if schedule is None:
    schedule = DiffusionSchedule.linear()
  if not (x0.shape == x_t.shape == noise.shape):
    raise ValueError(
        f"x0 {x0.shape}, x_t {x_t.shape} and noise {noise.shape} must have the same shape")
  if x0.ndim != 4:
    raise ValueError(f"expected NHWC arrays (B, H, W, C), got shape {x0.shape}")
  b, c = x0.shape[0], x0.shape[-1]
  if model_output.shape[:-1] != x0.shape[:-1]:
    raise ValueError(f"model output {model_output.shape} does not match latents {x0.shape}")
  if t.shape != (b,):
    raise ValueError(f"t must have shape ({b},), got {t.shape}")
  if learn_sigma and model_output.shape[-1] != 2 * c:
    raise ValueError(
        f"learn_sigma needs 2*C = {2 * c} output channels (eps, v), got {model_output.shape[-1]}")
  if model_output.shape[-1] < c:
    raise ValueError(f"model output has {model_output.shape[-1]} channels, fewer than C = {c}")

  out = model_output.astype(jnp.float32)
  x0 = x0.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  noise = noise.astype(jnp.float32)
  eps = out[..., :c]
  mse = _mean_flat(jnp.square(noise - eps))
  if not learn_sigma:
    vb = jnp.zeros_like(mse)
    return {"loss": mse, "mse": mse, "vb": vb}

  frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., c:]], axis=-1)
  model_mean, model_log_var, _ = schedule.p_mean_variance(frozen, x_t, t, clip_denoised=False)
  true_mean, _, true_log_var = schedule.q_posterior(x0, x_t, t)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LN2
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / _LN2
  vb = jnp.where(t == 0, nll, kl)
  return {"loss": mse + vb, "mse": mse, "vb": vb}
