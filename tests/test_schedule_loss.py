"""Diffusion schedule, respacing and the IDDPM training loss vs the official algorithms.

References: a float64 port of the official GaussianDiffusion / SpacedDiffusion tables
(tests/reference_samplers.py), diffusers DDPMScheduler (independent float32 tables), and a
PyTorch float64 port of the official `training_losses` (learn_sigma, MSE: mse + vb, decoder NLL
at t = 0), written below and differentiated with torch autograd. Ours runs in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pixart_jax.diffusion.losses import iddpm_loss
from pixart_jax.diffusion.schedule import DiffusionSchedule, space_timesteps
from reference_samplers import RefGaussianDiffusion, space_timesteps_ref

SCHED = DiffusionSchedule.linear()
TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2")


# ------------------------------------------------------------------ schedule

def test_linear_schedule_tables():
  ref = RefGaussianDiffusion(np.linspace(1e-4, 0.02, 1000))
  for name in TABLES:
    np.testing.assert_allclose(getattr(SCHED, name), getattr(ref, name), rtol=1e-13, err_msg=name)
    assert getattr(SCHED, name).dtype == np.float64
  ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                       beta_schedule="linear")
  np.testing.assert_allclose(SCHED.alphas_cumprod, ddpm.alphas_cumprod.double().numpy(), rtol=1e-6)
  fixed_small = np.array([ddpm._get_variance(t).item() for t in (1, 10, 500, 999)])
  # diffusers computes 1 - alphas_cumprod in float32 (cancellation at small t): loose bound
  np.testing.assert_allclose(SCHED.posterior_variance[[1, 10, 500, 999]], fixed_small, rtol=1e-3)
  assert abs(SCHED.alphas_cumprod[0] - 0.9999) < 1e-12
  assert abs(SCHED.alphas_cumprod[-1] - 4.04e-5) < 1e-7
  assert SCHED.posterior_log_variance_clipped[0] == np.log(SCHED.posterior_variance[1])
  acp32 = SCHED.table_f32("alphas_cumprod")
  assert acp32.dtype == jnp.float32 and acp32.shape == (1000,)
  np.testing.assert_array_equal(np.asarray(acp32), SCHED.alphas_cumprod.astype(np.float32))
  with pytest.raises(ValueError, match="not a float64 table"):
    SCHED.table_f32("num_timesteps")


@pytest.mark.parametrize("counts", [100, "100", "25", "ddim25", "10,15,20", [5, 1, 30], 1000])
def test_space_timesteps_and_respace(counts):
  ref_steps = space_timesteps_ref(1000, counts if not isinstance(counts, int) else str(counts))
  assert space_timesteps(1000, counts) == sorted(ref_steps)
  sp = SCHED.respace(counts)
  ref = RefGaussianDiffusion(np.linspace(1e-4, 0.02, 1000), ref_steps)
  np.testing.assert_array_equal(sp.timestep_map, ref.timestep_map)
  for name in TABLES:
    np.testing.assert_allclose(getattr(sp, name), getattr(ref, name), rtol=1e-12, err_msg=name)
  np.testing.assert_allclose(sp.alphas_cumprod, SCHED.alphas_cumprod[sp.timestep_map], rtol=1e-12)


def test_space_timesteps_errors():
  with pytest.raises(ValueError, match="integer stride"):
    space_timesteps(1000, "ddim999")
  with pytest.raises(ValueError, match="cannot divide"):
    space_timesteps(10, [11])
  with pytest.raises(ValueError, match="positive"):
    space_timesteps(10, [0])
  with pytest.raises(ValueError, match="betas"):
    DiffusionSchedule(np.array([0.1, 1.5]))


def _rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_q_sample_posterior_and_variance():
  x0, noise, v = _rand((3, 4, 4, 2), 0), _rand((3, 4, 4, 2), 1), _rand((3, 4, 4, 2), 2, 0.5)
  t = np.array([0, 500, 999])
  ref = RefGaussianDiffusion(np.linspace(1e-4, 0.02, 1000))
  e = lambda a: a[t][:, None, None, None]
  xt_ref = e(ref.sqrt_alphas_cumprod) * x0 + e(ref.sqrt_one_minus_alphas_cumprod) * noise
  xt = np.asarray(jax.jit(SCHED.q_sample)(x0, jnp.asarray(t), noise))
  np.testing.assert_allclose(xt, xt_ref, rtol=1e-6, atol=1e-6)
  mean, var, logv = jax.jit(SCHED.q_posterior)(x0, xt_ref.astype(np.float32), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(mean), e(ref.posterior_mean_coef1) * x0
                             + e(ref.posterior_mean_coef2) * xt_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var), np.broadcast_to(e(ref.posterior_variance), x0.shape),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(logv),
                             np.broadcast_to(e(ref.posterior_log_variance_clipped), x0.shape),
                             rtol=1e-6)
  frac = (v + 1) / 2
  lv_ref = frac * e(np.log(ref.betas)) + (1 - frac) * e(ref.posterior_log_variance_clipped)
  np.testing.assert_allclose(
      np.asarray(jax.jit(SCHED.learned_range_log_variance)(jnp.asarray(v), jnp.asarray(t))), lv_ref,
      rtol=1e-6)
  with pytest.raises(ValueError, match="same shape"):
    SCHED.q_sample(x0, jnp.asarray(t), noise[..., :1])


# ------------------------------------------------------------------ loss reference (torch f64)

def _normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) +
                ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_cdf(x):
  return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _disc_gauss_ll(x, means, log_scales):
  centered_x = x - means
  inv_stdv = torch.exp(-log_scales)
  cdf_plus = _approx_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = _approx_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
  log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
  cdf_delta = cdf_plus - cdf_min
  return torch.where(
      x < -0.999, log_cdf_plus,
      torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def official_training_losses(diff: RefGaussianDiffusion, output, x_start, t, noise, force_kl=False):
  """GaussianDiffusion.training_losses (LEARNED_RANGE, EPSILON, MSE) on NCHW torch float64.

  force_kl (test control only): use the KL also at t = 0 instead of the decoder NLL.
  """
  ex = lambda a: torch.from_numpy(a)[t].view(-1, 1, 1, 1)
  mean_flat = lambda x: x.mean(dim=list(range(1, x.ndim)))
  x_t = ex(diff.sqrt_alphas_cumprod) * x_start + ex(diff.sqrt_one_minus_alphas_cumprod) * noise
  c = x_t.shape[1]
  eps, model_var_values = torch.split(output, c, dim=1)
  frozen_eps = eps.detach()
  true_mean = ex(diff.posterior_mean_coef1) * x_start + ex(diff.posterior_mean_coef2) * x_t
  true_logvar = ex(diff.posterior_log_variance_clipped)
  min_log, max_log = ex(diff.posterior_log_variance_clipped), ex(np.log(diff.betas))
  frac = (model_var_values + 1) / 2
  model_log_variance = frac * max_log + (1 - frac) * min_log
  pred_xstart = (ex(diff.sqrt_recip_alphas_cumprod) * x_t
                 - ex(diff.sqrt_recipm1_alphas_cumprod) * frozen_eps)
  model_mean = ex(diff.posterior_mean_coef1) * pred_xstart + ex(diff.posterior_mean_coef2) * x_t
  kl = mean_flat(_normal_kl(true_mean, true_logvar, model_mean, model_log_variance)) / np.log(2.0)
  nll = -_disc_gauss_ll(x_start, model_mean, 0.5 * model_log_variance)
  decoder_nll = mean_flat(nll) / np.log(2.0)
  vb = kl if force_kl else torch.where(t == 0, decoder_nll, kl)
  mse = mean_flat((noise - eps) ** 2)
  return {"loss": mse + vb, "mse": mse, "vb": vb, "x_t": x_t}


def _loss_inputs(b=6, c=4, seed=0):
  t = np.array([0, 999, 500, 1, 0, 250][:b])
  x0 = _rand((b, 4, 4, c), seed, 0.8)  # spans x < -0.999, |x| < 0.999 and x > 0.999
  noise = _rand((b, 4, 4, c), seed + 1)
  out = np.concatenate(
      [noise + _rand((b, 4, 4, c), seed + 2, 0.3),
       np.tanh(_rand((b, 4, 4, c), seed + 3))], -1)
  return x0, noise, out.astype(np.float32), t


def _torch_ref(x0, noise, out, t, force_kl=False):
  to = lambda a: torch.from_numpy(
      np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))).astype(np.float64))
  out_t = to(out).requires_grad_(True)
  diff = RefGaussianDiffusion(np.linspace(1e-4, 0.02, 1000))
  terms = official_training_losses(diff, out_t, to(x0), torch.from_numpy(t), to(noise), force_kl)
  grad, = torch.autograd.grad(terms["loss"].mean(), out_t)
  nhwc = lambda a: a.detach().permute(0, 2, 3, 1).numpy()
  values = {k: v.detach().numpy() for k, v in terms.items() if k != "x_t"}
  return values, nhwc(terms["x_t"]), nhwc(grad)


def _rel(a, b):
  return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


def test_iddpm_loss_matches_official():
  x0, noise, out, t = _loss_inputs()
  ref, x_t, ref_grad = _torch_ref(x0, noise, out, t)
  xt_ours = jax.jit(SCHED.q_sample)(x0, jnp.asarray(t), noise)
  assert _rel(xt_ours, x_t) < 1e-6
  loss_fn = lambda o: iddpm_loss(o, x0, xt_ours, jnp.asarray(t), noise)
  terms, grad = jax.jit(lambda o: (loss_fn(o), jax.grad(lambda p: loss_fn(p)["loss"].mean())(o)))(
      jnp.asarray(out))
  for k in ("loss", "mse", "vb"):
    assert terms[k].shape == (6,) and terms[k].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(terms[k]), ref[k], rtol=1e-5, err_msg=k)
  # the batch discriminates: at t = 0 (samples 0 and 4) the KL would give a different vb
  kl_only = _torch_ref(x0, noise, out, t, force_kl=True)[0]["vb"]
  assert np.all(np.abs(kl_only[[0, 4]] - ref["vb"][[0, 4]]) > 1e-2 * np.abs(ref["vb"][[0, 4]]))
  assert _rel(grad, ref_grad) < 1e-5


def test_vb_does_not_train_eps():
  x0, noise, out, t = _loss_inputs()
  xt = jax.jit(SCHED.q_sample)(x0, jnp.asarray(t), noise)
  grads = jax.jit(lambda o: [
      jax.grad(lambda p: iddpm_loss(p, x0, xt, jnp.asarray(t), noise)[k].sum())(o)
      for k in ("vb", "mse")
  ])
  g_vb, g_mse = grads(jnp.asarray(out))
  g_vb, g_mse = np.asarray(g_vb), np.asarray(g_mse)
  assert np.all(g_vb[..., :4] == 0)
  assert np.all(np.abs(g_vb[..., 4:]).max(axis=(1, 2, 3)) > 0)  # every sample's v gets a gradient
  assert np.all(g_mse[..., 4:] == 0) and np.all(np.abs(g_mse[..., :4]).max(axis=(1, 2, 3)) > 0)


def test_iddpm_loss_without_sigma_and_errors():
  x0, noise, out, t = _loss_inputs(b=2)
  xt = jax.jit(SCHED.q_sample)(x0, jnp.asarray(t), noise)
  terms = jax.jit(lambda o: iddpm_loss(o, x0, xt, jnp.asarray(t), noise, learn_sigma=False))(
      jnp.asarray(out))
  np.testing.assert_allclose(np.asarray(terms["loss"]),
                             np.mean((noise - out[..., :4]) ** 2, axis=(1, 2, 3)), rtol=1e-6)
  assert np.all(np.asarray(terms["vb"]) == 0)
  out_bf16 = jnp.asarray(out, jnp.bfloat16)
  bf16 = jax.jit(lambda o: iddpm_loss(o, x0, xt, jnp.asarray(t), noise))(out_bf16)
  assert bf16["loss"].dtype == jnp.float32
  eps_bf16 = np.asarray(out_bf16.astype(jnp.float32))[..., :4]
  np.testing.assert_allclose(np.asarray(bf16["mse"]),
                             np.mean((noise - eps_bf16) ** 2, axis=(1, 2, 3)), rtol=1e-6)
  with pytest.raises(ValueError, match="2\\*C"):
    iddpm_loss(jnp.asarray(out[..., :6]), x0, xt, jnp.asarray(t), noise)
  with pytest.raises(ValueError, match="same shape"):
    iddpm_loss(jnp.asarray(out), x0, xt[..., :2], jnp.asarray(t), noise)
  with pytest.raises(ValueError, match="t must have shape"):
    iddpm_loss(jnp.asarray(out), x0, xt, jnp.asarray([0, 1, 2]), noise)
  with pytest.raises(ValueError, match="NHWC"):
    iddpm_loss(jnp.asarray(out[0]), x0[0], xt[0], jnp.asarray(t), noise[0])
