"""Samplers vs their references, step by step, on a fixed analytic eps-model (fp32 on our side).

References: diffusers schedulers (DPMSolverMultistep, SASolver, DDIM) and float64 numpy ports of
the OFFICIAL DPM-Solver++ and IDDPM loops (tests/reference_samplers.py).

Error metric: for every state of the trajectory, max|ours - ref| / max|ref|; the test takes the
worst state. The diffusers loops run with the float64 schedule's sigma table loaded into the
scheduler (so both sides use the same table) and float64 samples (DPMSolverMultistep casts the
sample to float32 inside `step`; SA-Solver and DDIM stay float64). A second check runs the
STOCK diffusers scheduler (its own float32 table, float32 loop) at a looser bound.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, SASolverScheduler
from diffusers.schedulers import scheduling_lcm, scheduling_sasolver

from pixart_jax.diffusion import guidance
from pixart_jax.diffusion.samplers import (DEFAULT_STEPS, SAMPLERS, sample, sample_ddim,
                                           sample_dpm_solver, sample_dpm_solver_official,
                                           sample_iddpm, sample_lcm, sample_sa_solver)
from pixart_jax.diffusion.samplers.dpm_solver import diffusers_timesteps
from pixart_jax.diffusion.samplers.lcm import lcm_timesteps
from pixart_jax.diffusion.schedule import DiffusionSchedule
from reference_samplers import analytic_model, official_dpm_solver_pp, official_iddpm_p_sample_loop

SHAPE = (2, 4, 4, 4)  # B, H, W, C
TOL = 1e-6
SCHED = DiffusionSchedule.linear()
ACP = SCHED.alphas_cumprod
SIG_VE = np.sqrt((1.0 - ACP) / ACP)


def _x_T(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _noise(steps, seed=1):
  return np.random.default_rng(seed).standard_normal((steps,) + SHAPE).astype(np.float32)


def _jax_model(learn_sigma=False):
  return lambda x, t: analytic_model(jnp, x, t[:, None, None, None], learn_sigma)


def _np_model(learn_sigma=False):
  return lambda x, t: analytic_model(np, x, t[:, None, None, None], learn_sigma)


def _run(fn, learn_sigma=False, **kw):
  """Our sampler, jitted, fp32: (x0, trajectory) as numpy."""
  x0, traj = jax.jit(lambda x: fn(_jax_model(learn_sigma), x, return_trajectory=True, **kw))(_x_T())
  return np.asarray(x0), np.asarray(traj)


def _worst_rel(ours, ref):
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return max(np.abs(o - r).max() / np.abs(r).max() for o, r in zip(ours, ref))


def _nchw(a, dtype):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))).to(dtype)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).double().numpy()


def _diffusers_loop(sched, steps, dtype, step_kw=lambda i: {}):
  """Runs sched (set_timesteps already called) with the analytic model; NHWC float64 trajectory."""
  x = _nchw(_x_T(), dtype)
  traj = [_nhwc(x)]
  for i, t in enumerate(sched.timesteps):
    eps = analytic_model(torch, x, t.to(dtype))
    x = sched.step(eps, t, x, **step_kw(i)).prev_sample
    traj.append(_nhwc(x))
  return np.stack(traj)


# ------------------------------------------------------------------ DPM-Solver++ (diffusers)

def _dpm_scheduler():
  return DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
      euler_at_final=False, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
      prediction_type="epsilon")


@pytest.mark.parametrize("steps", [20, 7])
def test_dpm_solver_matches_diffusers(steps):
  sched = _dpm_scheduler()
  sched.set_timesteps(steps)
  ts = sched.timesteps.numpy()
  np.testing.assert_array_equal(ts, diffusers_timesteps(steps))
  if steps == 20:
    assert ts[0] == 999 and ts[1] == 949 and ts[-1] == 50
  sched.sigmas = torch.from_numpy(np.append(SIG_VE[ts], 0.0))  # the same float64 table as ours
  ref = _diffusers_loop(sched, steps, torch.float64)
  x0, traj = _run(sample_dpm_solver, num_steps=steps)
  assert traj.shape == (steps + 1,) + SHAPE
  np.testing.assert_array_equal(x0, traj[-1])
  assert _worst_rel(traj, ref) < TOL


def test_dpm_solver_matches_stock_diffusers():
  """The stock scheduler (float32 table and loop): differs only by its float32 alphas_cumprod."""
  sched = _dpm_scheduler()
  sched.set_timesteps(20)
  ref = _diffusers_loop(sched, 20, torch.float32)
  _, traj = _run(sample_dpm_solver, num_steps=20)
  assert _worst_rel(traj, ref) < 2e-6


def test_dpm_solver_uses_eps_channels_only():
  f = jax.jit(lambda x: (sample_dpm_solver(_jax_model(), x, num_steps=5),
                         sample_dpm_solver(_jax_model(learn_sigma=True), x, num_steps=5)))
  base, wide = f(_x_T())
  np.testing.assert_array_equal(np.asarray(base), np.asarray(wide))


# ------------------------------------------------------------------ official DPM-Solver++

@pytest.mark.parametrize("steps,skip_type,lower_order_final", [(20, "time_uniform", True),
                                                               (14, "time_uniform", False),
                                                               (10, "logSNR", True),
                                                               (9, "time_quadratic", True)])
def test_dpm_solver_official_matches_reference(steps, skip_type, lower_order_final):
  seen = []
  _, ref = official_dpm_solver_pp(_np_model(), _x_T(), SCHED.betas, steps=steps, order=2,
                                  skip_type=skip_type, lower_order_final=lower_order_final,
                                  record_t=seen)
  assert len(seen) == steps  # the last grid point is never evaluated
  if steps == 20 and skip_type == "time_uniform":
    np.testing.assert_allclose(seen[:3], [999.0, 949.05, 899.1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(seen[-1], 49.95, atol=1e-9)
  _, traj = _run(sample_dpm_solver_official, num_steps=steps, skip_type=skip_type,
                 lower_order_final=lower_order_final)
  assert _worst_rel(traj, np.stack(ref)) < TOL


def test_dpm_solver_official_first_order():
  _, ref = official_dpm_solver_pp(_np_model(), _x_T(), SCHED.betas, steps=8, order=1)
  _, traj = _run(sample_dpm_solver_official, num_steps=8, order=1)
  assert _worst_rel(traj, np.stack(ref)) < TOL


# ------------------------------------------------------------------ SA-Solver

def _sa_reference(steps, noise, p_order, c_order, tau_func=None, monkeypatch=None, stock=False):
  sched = SASolverScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                            beta_schedule="linear", predictor_order=p_order,
                            corrector_order=c_order, prediction_type="epsilon", tau_func=tau_func,
                            algorithm_type="data_prediction", lower_order_final=True,
                            timestep_spacing="linspace")
  sched.set_timesteps(steps)
  dtype = torch.float32 if stock else torch.float64
  if not stock:
    ts = sched.timesteps.numpy()
    sched.sigmas = torch.from_numpy(np.append(SIG_VE[ts], SIG_VE[0]))
  queue = [_nchw(n, dtype) for n in noise]

  def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
    n = queue.pop(0)
    assert tuple(n.shape) == tuple(shape)
    return n.to(dtype)

  monkeypatch.setattr(scheduling_sasolver, "randn_tensor", fake_randn)
  traj = _diffusers_loop(sched, steps, dtype)
  assert not queue
  return traj


@pytest.mark.parametrize("steps,p_order,c_order,tau", [
    (25, 2, 2, None), (12, 3, 3, None), (8, 1, 1, "one"), (10, 2, 1, "zero")])
def test_sa_solver_matches_diffusers(monkeypatch, steps, p_order, c_order, tau):
  noise = _noise(steps)
  tau_fn = {None: None, "one": lambda t: 1.0, "zero": lambda t: 0.0}[tau]
  ref = _sa_reference(steps, noise, p_order, c_order, tau_fn, monkeypatch)
  _, traj = _run(sample_sa_solver, num_steps=steps, noise=jnp.asarray(noise),
                 predictor_order=p_order, corrector_order=c_order, tau_fn=tau_fn)
  assert _worst_rel(traj, ref) < TOL


def test_sa_solver_matches_stock_diffusers(monkeypatch):
  noise = _noise(25)
  ref = _sa_reference(25, noise, 2, 2, monkeypatch=monkeypatch, stock=True)
  _, traj = _run(sample_sa_solver, num_steps=25, noise=jnp.asarray(noise))
  assert _worst_rel(traj, ref) < 2e-6


# ------------------------------------------------------------------ IDDPM

@pytest.mark.parametrize("steps,clip", [(100, False), (13, False), (13, True)])
def test_iddpm_matches_official_reference(steps, clip):
  noise = _noise(steps)
  ref = official_iddpm_p_sample_loop(_np_model(True), _x_T(), SCHED.betas, steps,
                                     noise.astype(np.float64), clip_denoised=clip)
  _, traj = _run(sample_iddpm, num_steps=steps, noise=jnp.asarray(noise), learn_sigma=True,
                 clip_denoised=clip)
  assert _worst_rel(traj, np.stack(ref)) < TOL


def test_iddpm_needs_variance_channels():
  with pytest.raises(ValueError, match="2\\*C"):
    sample_iddpm(_jax_model(), jnp.asarray(_x_T()), num_steps=4, key=jax.random.key(0))


# ------------------------------------------------------------------ DDIM

@pytest.mark.parametrize("spacing,set_alpha_to_one,eta,steps", [
    ("trailing", True, 0.0, 50), ("leading", False, 0.0, 20), ("linspace", True, 0.0, 17),
    ("trailing", True, 0.7, 30)])
def test_ddim_matches_diffusers(spacing, set_alpha_to_one, eta, steps):
  sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", clip_sample=False,
                        set_alpha_to_one=set_alpha_to_one, steps_offset=0,
                        prediction_type="epsilon", timestep_spacing=spacing)
  sched.alphas_cumprod = torch.from_numpy(ACP)  # same float64 table as ours
  if not set_alpha_to_one:
    sched.final_alpha_cumprod = torch.tensor(ACP[0], dtype=torch.float64)
  sched.set_timesteps(steps)
  noise = _noise(steps)
  def kw(i):
    return {"eta": eta, "variance_noise": _nchw(noise[i], torch.float64)} if eta > 0 else {}

  ref = _diffusers_loop(sched, steps, torch.float64, kw)
  extra = {"noise": jnp.asarray(noise)} if eta > 0 else {}
  _, traj = _run(sample_ddim, num_steps=steps, eta=eta, timestep_spacing=spacing,
                 set_alpha_to_one=set_alpha_to_one, **extra)
  assert _worst_rel(traj, ref) < TOL


# ------------------------------------------------------------------ LCM

# LCM returns c_out x0_hat + c_skip x at every step, x0_hat = (x - sqrt(1 - acp) eps) / sqrt(acp): at t = 999 the
# model's own fp32 rounding is amplified 1 / sqrt(acp_999) ~ 156x with nothing to damp it (DDIM multiplies x0_hat
# by sqrt(acp_prev) next), so the fp32-vs-float64 bound is 1e-5 here (measured 2.1e-6 worst).
LCM_TOL = 1e-5


def _lcm_scheduler(original_steps=50, scaling=10.0):
  """PixArt-LCM's scheduler config (linear betas 1e-4 -> 0.02, epsilon, set_alpha_to_one)."""
  return LCMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      original_inference_steps=original_steps, clip_sample=False, set_alpha_to_one=True,
                      steps_offset=0, prediction_type="epsilon", timestep_scaling=scaling)


@pytest.mark.parametrize("steps,original_steps,scaling", [(2, 50, 10.0), (4, 50, 10.0),
                                                          (8, 50, 10.0), (3, 37, 4.0), (50, 50, 10.0)])
def test_lcm_matches_diffusers(steps, original_steps, scaling):
  sched = _lcm_scheduler(original_steps, scaling)
  sched.alphas_cumprod = torch.from_numpy(ACP)  # same float64 table as ours
  sched.set_timesteps(steps)
  np.testing.assert_array_equal(lcm_timesteps(steps, 1000, original_steps), sched.timesteps.numpy())
  noise = _noise(steps)
  gen = iter(range(steps))
  # diffusers draws the re-noising with randn_tensor: feed it our noise of step i instead.
  orig = scheduling_lcm.randn_tensor
  scheduling_lcm.randn_tensor = lambda *a, **k: _nchw(noise[next(gen)], torch.float64)
  try:
    ref = _diffusers_loop(sched, steps, torch.float64)
  finally:
    scheduling_lcm.randn_tensor = orig
  extra = {"noise": jnp.asarray(noise)} if steps > 1 else {}
  _, traj = _run(sample_lcm, learn_sigma=True, num_steps=steps, original_inference_steps=original_steps,
                 timestep_scaling=scaling, **extra)
  assert _worst_rel(traj, ref) < LCM_TOL


def test_lcm_one_step_is_the_boundary_condition():
  """One step returns f(x_T, 999) = c_out x0_hat + c_skip x_T (float64 reference = diffusers on the float64 table).

  In float32 x_T - sqrt(1 - acp) eps cancels: both terms are O(1), their difference O(sqrt(acp_999) = 0.0064), so
  one rounding of either term (6e-8) becomes ~1e-5 of the result whatever the order of operations (diffusers'
  float32 loop has the same error). Bound: 1e-4 (measured 2.8e-5)."""
  x = _x_T()
  ours = np.asarray(jax.jit(lambda x: sample_lcm(_jax_model(True), x, num_steps=1))(x))
  sched = _lcm_scheduler()
  sched.alphas_cumprod = torch.from_numpy(ACP)
  sched.set_timesteps(1)
  ref = _diffusers_loop(sched, 1, torch.float64)[-1]
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_lcm_matches_stock_diffusers_and_known_grid():
  np.testing.assert_array_equal(lcm_timesteps(4), [999, 759, 499, 259])
  sched = _lcm_scheduler()
  sched.set_timesteps(4)  # its own float32 table and loop
  noise = _noise(4)
  gen = iter(range(4))
  orig = scheduling_lcm.randn_tensor
  scheduling_lcm.randn_tensor = lambda *a, **k: _nchw(noise[next(gen)], torch.float32)
  try:
    ref = _diffusers_loop(sched, 4, torch.float32)
  finally:
    scheduling_lcm.randn_tensor = orig
  _, traj = _run(sample_lcm, num_steps=4, noise=jnp.asarray(noise))
  assert _worst_rel(traj, ref) < 1e-4


def test_lcm_bad_inputs():
  m, x = _jax_model(), jnp.asarray(_x_T())
  with pytest.raises(ValueError, match="exceeds the 50 timesteps of the distillation grid"):
    sample_lcm(m, x, num_steps=51, key=jax.random.key(0))
  with pytest.raises(ValueError, match="original_inference_steps must lie in"):
    sample_lcm(m, x, num_steps=2, original_inference_steps=0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="lcm with more than one step is stochastic"):
    sample_lcm(m, x, num_steps=2)
  one = np.asarray(jax.jit(lambda x: sample_lcm(m, x, num_steps=1))(x))  # one step: no key needed
  assert np.isfinite(one).all()


# ------------------------------------------------------------------ one program per sampler

_EXTRA = {"ddim": {"eta": 0.5}}  # exercise the key-driven noise of every stochastic sampler
_STOCHASTIC = {"sa-solver", "iddpm", "ddim", "lcm"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_single_trace_and_single_loop(name):
  traces = {"model": 0, "outer": 0}
  learn_sigma = name == "iddpm"

  def model_fn(x, t):
    traces["model"] += 1
    return analytic_model(jnp, x, t[:, None, None, None], learn_sigma)

  def run(x, key):
    traces["outer"] += 1
    return sample(name, model_fn, x, num_steps=6, key=key, **_EXTRA.get(name, {}))

  f = jax.jit(run)
  x = jnp.asarray(_x_T())
  out1 = np.asarray(f(x, jax.random.key(0)))
  out2 = np.asarray(f(x + 1.0, jax.random.key(0)))
  out3 = np.asarray(f(x, jax.random.key(0)))
  out4 = np.asarray(f(x, jax.random.key(1)))
  assert traces == {"model": 1, "outer": 1}  # model traced once (loop not unrolled); no retrace
  assert out1.shape == SHAPE and np.isfinite(out2).all()
  np.testing.assert_array_equal(out1, out3)  # deterministic given the key
  if name in _STOCHASTIC:
    assert np.abs(out1 - out4).max() > 1e-3  # and the key matters
  else:
    np.testing.assert_array_equal(out1, out4)
  jaxpr = jax.make_jaxpr(run)(x, jax.random.key(0))
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
  assert len(loops) == 1 and loops[0].params.get("length", 6) == 6


# ------------------------------------------------------------------ registry and input checks

def test_registry():
  assert DEFAULT_STEPS == {"dpm-solver": 20, "dpm-solver-official": 20, "sa-solver": 25,
                           "iddpm": 100, "ddim": 50, "lcm": 4}
  assert set(SAMPLERS) == set(DEFAULT_STEPS)
  with pytest.raises(ValueError, match="dpm-solver, dpm-solver-official, sa-solver, iddpm, ddim, lcm"):
    sample("euler", _jax_model(), jnp.asarray(_x_T()))
  x = jnp.asarray(_x_T())
  a, b = jax.jit(lambda x: (sample("ddim", _jax_model(), x, num_steps=5),
                            sample_ddim(_jax_model(), x, num_steps=5)))(x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  traj = jax.eval_shape(lambda x: sample("dpm-solver", _jax_model(), x, return_trajectory=True)[1],
                        x)
  assert traj.shape[0] == 21  # default 20 steps


def test_bad_inputs():
  m, x = _jax_model(), jnp.asarray(_x_T())
  with pytest.raises(ValueError, match="NHWC"):
    sample_dpm_solver(m, x[0], num_steps=4)
  with pytest.raises(ValueError, match="num_steps"):
    sample_dpm_solver(m, x, num_steps=0)
  with pytest.raises(ValueError, match="num_steps"):
    sample_ddim(m, x, num_steps=1001)
  with pytest.raises(ValueError, match="noise must have shape"):
    sample_iddpm(_jax_model(True), x, num_steps=4, noise=jnp.zeros((3,) + SHAPE))
  with pytest.raises(ValueError, match="key"):
    sample_ddim(m, x, num_steps=4, eta=1.0)
  with pytest.raises(ValueError, match="key"):
    sample_sa_solver(m, x, num_steps=4)
  with pytest.raises(ValueError, match="key"):
    sample_iddpm(_jax_model(True), x, num_steps=4)
  with pytest.raises(ValueError, match="skip_type"):
    sample_dpm_solver_official(m, x, num_steps=4, skip_type="karras")
  with pytest.raises(ValueError, match="timestep_spacing"):
    sample_ddim(m, x, num_steps=4, timestep_spacing="uniform")
  with pytest.raises(ValueError, match="channels"):
    sample_dpm_solver(lambda x, t: x[..., :2], x, num_steps=4)


# ------------------------------------------------------------------ guidance

def _fake_apply(log):
  """A caption- and mask-dependent network: out (N,H,W,8) from x (N,H,W,4)."""
  def apply_fn(x, t, cap, mask):
    log.append(x.shape[0])
    pooled = (cap * mask[..., None]).sum(1) / (mask.sum(1, keepdims=True) + 1.0)  # (N, D)
    feat = jnp.tanh(pooled[:, :8])[:, None, None, :]
    return jnp.concatenate([x, -x], -1) * (1.0 + feat) + 1e-3 * t[:, None, None, None]
  return apply_fn


def _prompts():
  rng = np.random.default_rng(3)
  cond = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
  unc = jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32)
  cmask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  umask = jnp.asarray([[1, 0, 0, 0, 0, 0]], jnp.int32)
  return cond, cmask, unc, umask


@pytest.mark.parametrize("mode", ["diffusers", "official"])
def test_cfg_batch_doubling(mode):
  cond, cmask, unc, umask = _prompts()
  log = []
  apply_fn = _fake_apply(log)
  x, t = jnp.asarray(_x_T()), jnp.asarray([500.0, 500.0])
  fn = guidance.cfg_model_fn(apply_fn, (cond, cmask), (unc, umask), 4.5, mode=mode)
  out = jax.jit(fn)(x, t)
  assert log == [4]  # one forward over 2B
  un_b = jnp.broadcast_to(unc, cond.shape)
  un_mask = jnp.broadcast_to(umask, cmask.shape) if mode == "diffusers" else cmask
  u, c = (np.asarray(a, np.float64) for a in jax.jit(apply_fn)(
      jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([un_b, cond]),
      jnp.concatenate([un_mask, cmask])).reshape((2,) + x.shape[:3] + (8,)))
  np.testing.assert_allclose(np.asarray(out), u + 4.5 * (c - u), rtol=1e-5, atol=1e-5)
  other = "official" if mode == "diffusers" else "diffusers"
  out_other = jax.jit(guidance.cfg_model_fn(apply_fn, (cond, cmask), (unc, umask), 4.5,
                                            mode=other))(x, t)
  assert np.abs(np.asarray(out_other) - np.asarray(out)).max() > 1e-3  # the mask choice matters


def test_cfg_scale_one_skips_uncond():
  cond, cmask, _, _ = _prompts()
  log = []
  apply_fn = _fake_apply(log)
  x, t = jnp.asarray(_x_T()), jnp.asarray([10.0, 10.0])
  out = jax.jit(guidance.cfg_model_fn(apply_fn, (cond, cmask), None, 1.0))(x, t)
  assert log == [2]
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(apply_fn)(x, t, cond, cmask)),
                             rtol=1e-6, atol=1e-6)


def test_cfg_official_guide_channels_quirk():
  cond, cmask, unc, _ = _prompts()
  apply_fn = _fake_apply([])
  x, t = jnp.asarray(_x_T()), jnp.asarray([300.0, 300.0])
  fn = guidance.cfg_model_fn(apply_fn, (cond, cmask), (unc, None), 3.0, mode="official",
                             guide_channels=3)
  out = np.asarray(jax.jit(fn)(x, t))
  u = np.asarray(jax.jit(apply_fn)(x, t, jnp.broadcast_to(unc, cond.shape), cmask))
  c = np.asarray(jax.jit(apply_fn)(x, t, cond, cmask))
  np.testing.assert_allclose(out[..., :3], u[..., :3] + 3.0 * (c[..., :3] - u[..., :3]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(out[..., 3:], c[..., 3:], rtol=1e-6, atol=1e-6)
  assert np.abs(out[..., 3:] - (u[..., 3:] + 3.0 *
                                (c[..., 3:] - u[..., 3:]))).max() > 1e-2  # really unguided


def test_cfg_bad_inputs():
  cond, cmask, unc, umask = _prompts()
  apply_fn = _fake_apply([])
  with pytest.raises(ValueError, match="mode"):
    guidance.cfg_model_fn(apply_fn, (cond, cmask), (unc, umask), 2.0, mode="both")
  with pytest.raises(ValueError, match="uncond"):
    guidance.cfg_model_fn(apply_fn, (cond, cmask), None, 2.0)
  with pytest.raises(ValueError, match="uncond mask"):
    guidance.cfg_model_fn(apply_fn, (cond, cmask), (unc, None), 2.0, mode="diffusers")


def test_cfg_inside_sampler():
  """Guidance composes with a sampler into one jitted program (one traced 2B forward)."""
  cond, cmask, unc, umask = _prompts()
  log = []
  fn = guidance.cfg_model_fn(_fake_apply(log), (cond, cmask), (unc, umask), 4.5)
  out = jax.jit(lambda x: sample_dpm_solver(fn, x, num_steps=5))(jnp.asarray(_x_T()))
  assert log == [4] and np.isfinite(np.asarray(out)).all()
