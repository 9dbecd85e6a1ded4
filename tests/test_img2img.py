"""Image-to-image (strength) and inpainting (known latents + mask) in every sampler.

* strength 1 and an all-ones mask are text-to-image, bit for bit, for every sampler;
* the img2img start (timesteps that run, noised latents) and the whole run match diffusers' schedulers driven the
  way its img2img pipelines drive them (`get_timesteps`, `set_begin_index`, `add_noise(image, noise, t[:1])`;
  LCM: `set_timesteps(steps, strength=...)`), float64 tables, fp32 loop;
* inpainting matches diffusers' StableDiffusionInpaintPipeline loop (blend with `add_noise` at t[i+1] after each
  step, the clean image after the last);
* a strength that leaves no step returns the image's latents; bad inputs get one ValueError line.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, SASolverScheduler
from diffusers.schedulers import scheduling_lcm, scheduling_sasolver

from pixart_jax.diffusion.samplers import SAMPLERS, Known, img2img_start, sample
from pixart_jax.diffusion.schedule import DiffusionSchedule
from reference_samplers import analytic_model

SHAPE = (2, 4, 4, 4)  # B, H, W, C
ACP = DiffusionSchedule.linear().alphas_cumprod
SIG_VE = np.sqrt((1.0 - ACP) / ACP)
TOL = 1e-6
_STEPS = {"dpm-solver": 10, "dpm-solver-official": 10, "sa-solver": 10, "iddpm": 10, "ddim": 10, "lcm": 4}


def _arr(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


X_T, IMAGE = _arr(0), _arr(1) * 0.7
MASK = np.zeros(SHAPE[:3] + (1,), np.float32)
MASK[:, 2:] = 1.0  # repaint the bottom half


def _model(name):
  learn_sigma = name in ("iddpm", "lcm")
  return lambda x, t: analytic_model(jnp, x, t[:, None, None, None], learn_sigma)


def _ours(name, strength=1.0, image=None, mask=None, steps=None, trajectory=False, **kw):
  steps = steps or _STEPS[name]

  def run(x, image, mask):
    known = None if image is None else Known(image, mask)
    return sample(name, _model(name), x, num_steps=steps, key=jax.random.key(3), strength=strength, known=known,
                  return_trajectory=trajectory, **kw)

  out = jax.jit(run)(jnp.asarray(X_T), None if image is None else jnp.asarray(image),
                     None if mask is None else jnp.asarray(mask))
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_strength_one_and_all_ones_mask_are_text_to_image_bitwise(name):
  t2i = _ours(name)
  np.testing.assert_array_equal(_ours(name, 1.0, IMAGE), t2i)
  np.testing.assert_array_equal(_ours(name, 1.0, IMAGE, np.ones_like(MASK)), t2i)
  # ... and the image / mask do change the result otherwise
  assert np.abs(_ours(name, 0.6, IMAGE) - t2i).max() > 1e-3
  assert np.abs(_ours(name, 1.0, IMAGE, MASK) - t2i).max() > 1e-3


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_step_left_returns_the_image(name):
  out = _ours(name, 0.01, IMAGE)  # int(steps * 0.01) = 0 steps
  np.testing.assert_array_equal(out, IMAGE)
  assert img2img_start(10, 0.01) == 10 and img2img_start(10, 0.55) == 5 and img2img_start(10, 1.0) == 0


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_inpainting_ends_with_the_image_in_the_kept_region(name):
  out = _ours(name, 1.0, IMAGE, MASK)
  np.testing.assert_array_equal(out[:, :2], IMAGE[:, :2])  # kept rows: the image's latents, exactly


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_edit_is_one_program_with_one_loop(name):
  """img2img + inpainting: the model traced once inside ONE scan over the steps that run; new images, masks and
  noise reuse the program."""
  traces = {"model": 0, "outer": 0}

  def model_fn(x, t):
    traces["model"] += 1
    return _model(name)(x, t)

  def run(x, image, mask):
    traces["outer"] += 1
    return sample(name, model_fn, x, num_steps=6, key=jax.random.key(0), strength=0.5, known=Known(image, mask))

  f = jax.jit(run)
  args = (jnp.asarray(X_T), jnp.asarray(IMAGE), jnp.asarray(MASK))
  a = np.asarray(f(*args))
  b = np.asarray(f(args[0] + 1.0, -args[1], 1.0 - args[2]))
  assert traces == {"model": 1, "outer": 1} and np.abs(a - b).max() > 1e-3
  jaxpr = jax.make_jaxpr(run)(*args)
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
  want = 6 if name == "lcm" else 3  # LCM runs all its steps on the cut grid; the others the last int(6 * 0.5)
  assert len(loops) == 1 and loops[0].params.get("length") == want


# ------------------------------------------------------------------ diffusers' img2img / inpainting loops

def _nchw(a, dtype=torch.float64):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a), (0, 3, 1, 2)))).to(dtype)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).double().numpy()


def _scheduler(name):
  common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")
  if name == "dpm-solver":
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                       lower_order_final=True, euler_at_final=False, timestep_spacing="linspace",
                                       steps_offset=0, final_sigmas_type="zero")
  if name == "ddim":
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                         timestep_spacing="trailing")
  if name == "sa-solver":
    return SASolverScheduler(**common, predictor_order=2, corrector_order=2, algorithm_type="data_prediction",
                             lower_order_final=True, timestep_spacing="linspace")
  return LCMScheduler(**common, original_inference_steps=50, clip_sample=False, set_alpha_to_one=True,
                      steps_offset=0, timestep_scaling=10.0)


def _diffusers_edit(name, steps, strength, mask, noise, monkeypatch):
  """diffusers' img2img (mask None) / legacy inpainting loop: (timesteps that ran, trajectory NHWC float64)."""
  sched = _scheduler(name)
  sched.alphas_cumprod = torch.from_numpy(ACP)  # the float64 table we use
  if name == "lcm":  # LatentConsistencyModelImg2ImgPipeline: the strength cuts the distillation grid
    sched.set_timesteps(steps, strength=strength)
    timesteps = sched.timesteps
  else:  # StableDiffusionImg2ImgPipeline.get_timesteps
    sched.set_timesteps(steps)
    if name != "ddim":
      sched.sigmas = torch.from_numpy(np.append(SIG_VE[sched.timesteps.numpy()],
                                                0.0 if name == "dpm-solver" else SIG_VE[0]))
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
      sched.set_begin_index(t_start * sched.order)
  queue = [_nchw(n) for n in noise]
  monkeypatch.setattr(scheduling_sasolver, "randn_tensor", lambda *a, **k: queue.pop(0))
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: queue.pop(0))
  image, x_T = _nchw(IMAGE), _nchw(X_T)
  x = sched.add_noise(image, x_T, timesteps[:1])
  traj = [_nhwc(x)]
  keep = None if mask is None else 1.0 - _nchw(mask)
  for i, t in enumerate(timesteps):
    eps = analytic_model(torch, x, t.double())
    x = sched.step(eps, t, x).prev_sample
    if keep is not None:  # StableDiffusionInpaintPipeline, 4-channel UNet branch
      known = sched.add_noise(image, x_T, timesteps[i + 1:i + 2]) if i < len(timesteps) - 1 else image
      x = keep * known + (1.0 - keep) * x
    traj.append(_nhwc(x))
  return timesteps.numpy(), np.stack(traj)


@pytest.mark.parametrize("name,steps,strength,masked", [
    ("dpm-solver", 20, 0.6, False), ("dpm-solver", 7, 0.3, False), ("dpm-solver", 20, 0.75, True),
    ("ddim", 10, 0.55, False), ("ddim", 10, 0.8, True),
    ("sa-solver", 12, 0.7, False), ("sa-solver", 12, 0.5, True),
    ("lcm", 4, 0.5, False), ("lcm", 2, 0.9, True)])
def test_img2img_and_inpainting_match_diffusers(monkeypatch, name, steps, strength, masked):
  mask = MASK if masked else None
  n_run = steps if name == "lcm" else steps - img2img_start(steps, strength)
  noise = [_arr(10 + i) for i in range(n_run)]
  ts, ref = _diffusers_edit(name, steps, strength, mask, noise, monkeypatch)
  assert len(ts) == n_run and len(ref) == n_run + 1
  if name == "lcm":
    assert ts[0] < 999  # the strength cut the grid
  kw = {"noise": jnp.asarray(np.stack(noise))} if name in ("sa-solver", "lcm") else {}
  x0, traj = _ours(name, strength, IMAGE, mask, steps=steps, trajectory=True, **kw)
  # the start: add_noise(image, x_T, timesteps[0]) at the timestep diffusers selects
  np.testing.assert_allclose(traj[0], ref[0], rtol=0, atol=1e-6)
  worst = max(np.abs(o - r).max() / np.abs(r).max() for o, r in zip(traj, ref))
  assert worst < (1e-5 if name == "lcm" else TOL), worst
  np.testing.assert_array_equal(x0, traj[-1])


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan"), True])
def test_bad_strength(strength):
  with pytest.raises(ValueError, match=r"strength must be a finite number > 0 and <= 1, got"):
    _ours("dpm-solver", strength, IMAGE)


def test_bad_known():
  with pytest.raises(ValueError, match="needs the image's latents"):
    _ours("ddim", 0.5)
  with pytest.raises(ValueError, match="must have the shape of x_T"):
    _ours("ddim", 0.5, IMAGE[:1])
  with pytest.raises(ValueError, match=r"latent mask must have shape \(2, 4, 4, 1\)"):
    _ours("ddim", 0.5, IMAGE, MASK[..., 0])
