"""Latent consistency distillation on the trainer: the LCD arithmetic against the official PixArt-LCM code (PyTorch),
a distillation run that resumes bitwise, the teacher left untouched, LCM-LoRA (adapters only, PEFT export loaded
by PEFT / diffusers), and the config checks."""
from __future__ import annotations

import logging
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import torch
from flax import nnx

from pixart_jax import lora
from pixart_jax.convert.dit import load_transformer
from pixart_jax.convert.orbax_io import save_transformer_orbax
from pixart_jax.diffusion import consistency as cm
from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.models.dit import PixArtSigma
from pixart_jax.train import loop
from pixart_jax.train.config_defaults import check_config
from pixart_jax.train.metrics import read_jsonl
from dit_reference import rel_err
from train_testlib import smoke_config

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py: fast compiles, one cache


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic, against the official code (train_scripts/train_pixart_lcm.py, transcribed in PyTorch)
# ---------------------------------------------------------------------------------------------------------------
def _official_scalings(timestep, sigma_data=0.5):
  c_skip = sigma_data**2 / ((timestep / 0.1) ** 2 + sigma_data**2)
  c_out = (timestep / 0.1) / ((timestep / 0.1) ** 2 + sigma_data**2) ** 0.5
  return c_skip, c_out


class _OfficialDDIMSolver:
  def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
    step_ratio = timesteps // ddim_timesteps
    self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
    self.ddim_alpha_cumprods_prev = np.asarray([alpha_cumprods[0]]
                                               + alpha_cumprods[self.ddim_timesteps[:-1]].tolist())
    self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
    self.ddim_alpha_cumprods_prev = torch.from_numpy(self.ddim_alpha_cumprods_prev)

  def ddim_step(self, pred_x0, pred_noise, timestep_index):
    a = self.ddim_alpha_cumprods_prev.gather(-1, timestep_index).reshape(-1, 1, 1, 1)
    return a.sqrt() * pred_x0 + (1.0 - a).sqrt() * pred_noise


@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_lcd_arithmetic_matches_the_official_code(loss):
  """Given the networks' eps outputs, the student's f, the teacher's guided DDIM step, the target's f and the loss
  equal the official script's (fp32, <= 1e-5), for every index of the skipping-step grid."""
  sched = DiffusionSchedule.linear()
  acp = sched.alphas_cumprod
  lcm = cm.LcmConfig(guidance=5.5, loss=loss)
  tb = cm.SolverTables.build(sched, lcm.num_ddim_timesteps)
  solver = _OfficialDDIMSolver(acp)
  np.testing.assert_array_equal(tb.start, solver.ddim_timesteps.numpy())
  rng = np.random.default_rng(0)
  b = 50
  index = np.arange(b)  # every grid index once
  x0, noise, e_s, e_c, e_u, e_t = (rng.standard_normal((b, 4, 4, 3)).astype(np.float32) for _ in range(6))
  # official (NCHW does not matter for these elementwise ops)
  idx_t = torch.from_numpy(index)
  start = solver.ddim_timesteps[idx_t]
  topk = 1000 // 50
  end = torch.where(start - topk < 0, torch.zeros_like(start), start - topk)
  acp_t = torch.from_numpy(acp)  # float64, as the official IDDPM tables
  a_s = acp_t[start].reshape(-1, 1, 1, 1)
  a_e = acp_t[end].reshape(-1, 1, 1, 1)
  x_t = a_s.sqrt() * torch.from_numpy(x0) + (1 - a_s).sqrt() * torch.from_numpy(noise)
  x0_of = lambda x, e, a: (x - (1 - a).sqrt() * e) / a.sqrt()  # noqa: E731
  cs_s, co_s = (v.reshape(-1, 1, 1, 1) for v in _official_scalings(start))
  cs_e, co_e = (v.reshape(-1, 1, 1, 1) for v in _official_scalings(end))
  model_pred = cs_s * x_t + co_s * x0_of(x_t, torch.from_numpy(e_s), a_s)
  w = lcm.guidance - 1.0  # the official LCM form c + w (c - u)
  ec, eu = torch.from_numpy(e_c), torch.from_numpy(e_u)
  pred_x0 = x0_of(x_t, ec, a_s) + w * (x0_of(x_t, ec, a_s) - x0_of(x_t, eu, a_s))
  pred_noise = ec + w * (ec - eu)
  x_prev = solver.ddim_step(pred_x0, pred_noise, idx_t).float()
  target = cs_e * x_prev + co_e * x0_of(x_prev, torch.from_numpy(e_t), a_e)
  if loss == "l2":
    want_loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
  else:
    want_loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + lcm.huber_c**2) - lcm.huber_c)
  # ours
  idx = jnp.asarray(index)
  xs = sched.q_sample(jnp.asarray(x0), jnp.asarray(tb.start)[idx], jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(xs), x_t.numpy(), rtol=1e-5, atol=1e-6)
  at = lambda *names: [tb.take(n, idx) for n in names]  # noqa: E731
  got = cm.consistency(xs, jnp.asarray(e_s), *at("sa_start", "s1m_start", "c_skip_start", "c_out_start"))
  e_g = jnp.asarray(e_u) + lcm.guidance * (jnp.asarray(e_c) - jnp.asarray(e_u))
  xp = cm.ddim_step(xs, e_g, *at("sa_start", "s1m_start", "sa_prev", "s1m_prev"))
  want = cm.consistency(xp, jnp.asarray(e_t), *at("sa_end", "s1m_end", "c_skip_end", "c_out_end"))
  for ours_a, theirs in ((got, model_pred), (xp, x_prev), (want, target)):  # per grid index: relative to its scale
    for j in range(b):
      assert rel_err(np.asarray(ours_a)[j], theirs.numpy()[j]) <= 1e-5, j
  ours = float(jnp.mean(cm.distance(got, want, loss, lcm.huber_c)))
  assert ours == pytest.approx(float(want_loss), rel=1e-5)
  # The boundary condition: f(x, 0) = x (c_skip 1, c_out 0 at the grid's first end point).
  assert tb.end[0] == 0 and tb.c_skip_end[0] == 1.0 and tb.c_out_end[0] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# On the trainer
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny random teacher (no zero-init layers, so every path carries gradient) as an Orbax dir."""
  spec = loop.model_spec(smoke_config().model)
  model = PixArtSigma(spec.cfg, rngs=nnx.Rngs(5))
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = v.get_value()
    v.set_value(x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype))
  return save_transformer_orbax(model, tmp_path_factory.mktemp("teacher") / "teacher")


def _distill_config(teacher_dir, **overrides):
  c = smoke_config(**overrides)
  c.init_from = str(teacher_dir)
  c.distill.enabled = True
  c.ema.rate = 0.95
  c.optimizer.lr = 1e-3
  return c


def _host(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir):
  """An uninterrupted 4-step distillation and a 2-step one of the same config (checkpoints every 2 steps)."""
  base = tmp_path_factory.mktemp("distill")
  full = loop.train_and_evaluate(_distill_config(teacher_dir, steps=4, ckpt_every=2), str(base / "full"))
  half = loop.train_and_evaluate(_distill_config(teacher_dir, steps=2, ckpt_every=2), str(base / "half"))
  return {"full": base / "full", "half": base / "half", "result": full, "half_result": half}


@pytest.mark.slow
def test_distillation_trains_the_student_and_its_ema_target(reference, teacher_dir):
  res = reference["result"]
  assert res.step == 4 and math.isfinite(res.last_metrics["loss"])
  assert res.last_metrics["teacher_step_norm"] > 0
  teacher = lora.flat_params(load_transformer(teacher_dir))
  student = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(res.state.params)}
  ema = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(res.state.ema)}
  assert sorted(student) == sorted(teacher)
  moved = [p for p in teacher if not np.array_equal(np.asarray(student[p]), np.asarray(teacher[p]))]
  assert len(moved) > len(teacher) // 2  # the student left the teacher
  # The target is the EMA (rate 0.95): between the teacher and the student, not equal to either.
  p = moved[0]
  assert not np.array_equal(np.asarray(ema[p]), np.asarray(student[p]))
  assert not np.array_equal(np.asarray(ema[p]), np.asarray(teacher[p]))



@pytest.mark.slow
def test_distillation_stop_and_resume_is_bitwise_identical(reference, tmp_path, teacher_dir, caplog):
  """2 steps + stop + resume + 2 steps == 4 steps: student, EMA target, optimizer state, losses."""
  wd = tmp_path / "resumed"
  shutil.copytree(reference["half"], wd)
  with caplog.at_level(logging.INFO, logger="pixart_jax.train.loop"):
    res = loop.train_and_evaluate(_distill_config(teacher_dir, steps=4, ckpt_every=2), str(wd))
  assert "train state from checkpoint 2 (LCM)" in caplog.text
  full = reference["result"].state
  for a, b in ((res.state.params, full.params), (res.state.ema, full.ema), (res.state.opt_state, full.opt_state)):
    for x, y in zip(_host(a), _host(b), strict=True):
      np.testing.assert_array_equal(x, y)
  assert _losses(wd) == _losses(reference["full"])
  assert len(_losses(wd)) == 4


@pytest.mark.slow
def test_lcm_lora_trains_adapters_only_and_exports_peft(tmp_path, teacher_dir):
  c = _distill_config(teacher_dir, steps=2, ckpt_every=2)
  c.ema.rate = None  # the official LCM-LoRA: the target is the adapted student under stop-gradient
  c.lora = mlc.ConfigDict(dict(rank=2, alpha=4.0, targets=lora.ATTENTION_TARGETS, rslora=False))
  res = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert res.step == 2 and math.isfinite(res.last_metrics["loss"])
  assert all(set(v) == {"a", "b"} for v in res.state.params.values())  # the state: adapters only
  ours, cfg = lora.load_lora(tmp_path / "run" / "lora")
  assert any(float(np.abs(np.asarray(ad["b"])).max()) > 0 for ad in ours.values())
  spec = loop.model_spec(c.model)
  peft, peft_cfg = lora.load_peft_lora(tmp_path / "run" / "lora_peft", spec.cfg)
  assert (peft_cfg.rank, peft_cfg.alpha, peft_cfg.rslora) == (cfg.rank, cfg.alpha, cfg.rslora)
  assert sorted(peft) == sorted(ours)
  for p in ours:
    np.testing.assert_array_equal(np.asarray(peft[p]["a"]), np.asarray(ours[p]["a"]))
    np.testing.assert_array_equal(np.asarray(peft[p]["b"]), np.asarray(ours[p]["b"]))


def test_peft_export_loads_in_peft_and_matches_diffusers(tmp_path):
  """`lora.save_peft_lora` -> `peft.PeftModel.from_pretrained` on diffusers' PixArtTransformer2DModel gives the
  outputs of our merged model."""
  from peft import PeftModel

  import pixart_jax.convert.dit as dit_convert
  from dit_reference import diffusers_forward, rel_err, tiny_diffusers_transformer

  ref = tiny_diffusers_transformer(layers=2, heads=2, head_dim=8)
  ref.save_pretrained(tmp_path / "base")
  base = dit_convert.load_transformer(tmp_path / "base")
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=lora.ATTENTION_TARGETS + (r".*mlp\.fc2\.kernel",))
  adapters = lora.init_lora(lora.flat_params(base), cfg, jax.random.key(0))
  adapters = {p: {"a": ad["a"], "b": 0.2 * jax.random.normal(jax.random.key(i), ad["b"].shape)}
              for i, (p, ad) in enumerate(adapters.items())}
  lora.save_peft_lora(adapters, cfg, base.cfg, tmp_path / "peft")
  peft_model = PeftModel.from_pretrained(ref, tmp_path / "peft")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([5.0, 700.0], np.float32)
  y = rng.standard_normal((2, 6, 24)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([[3], [6]])
  want = diffusers_forward(peft_model.base_model.model, x, t, y, mask.astype(np.int64))
  got = np.asarray(lora.merge_lora(base, adapters, cfg)(x, t, y, mask))
  assert rel_err(got, want) <= 1e-5
  base_out = np.asarray(dit_convert.load_transformer(tmp_path / "base")(x, t, y, mask))
  assert rel_err(base_out, want) > 1e-3  # the adapters change the output


@pytest.mark.parametrize("field, value, match", [
    ("loss", "l1", "distill.loss must be one of huber, l2"),
    ("guidance", 0.5, "distill.guidance must be a finite CFG scale >= 1"),
    ("num_ddim_timesteps", 0, r"distill.num_ddim_timesteps must lie in \[1, 1000\]"),
    ("huber_c", 0.0, "distill.huber_c must be > 0"),
])
def test_bad_distill_config_is_refused_naming_the_field(field, value, match):
  c = smoke_config()
  c.distill.enabled = True
  c.distill[field] = value
  with pytest.raises(ValueError, match=match):
    check_config(c)


def test_distillation_needs_a_teacher(tmp_path):
  c = smoke_config()
  c.distill.enabled = True
  with pytest.raises(ValueError, match="needs config.init_from"):
    loop.train_and_evaluate(c, str(tmp_path / "run"))


def test_lcm_1024_recipe_is_a_runnable_document():
  """configs/distill/lcm_1024.py: run commands in its docstring; full, LCM-LoRA and smoke configs pass the checks
  and select the distillation kind (LCM-LoRA: adapters on the official target modules)."""
  import importlib.util

  from pixart_jax.train import trainables
  from pixart_jax.train.trainables.distill import DistillTrainable

  path = pathlib.Path(__file__).parents[1] / "configs" / "distill" / "lcm_1024.py"
  spec = importlib.util.spec_from_file_location("lcm_1024", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for cmd in ("python -m pixart_jax.train --config configs/distill/lcm_1024.py ",
              "--config configs/distill/lcm_1024.py:lora", "python -m pixart_jax.plan --config configs/distill/lcm_1024.py"):
    assert cmd in module.__doc__
  for arg in (None, "lora", "smoke"):
    c = module.get_config(arg)
    check_config(c)
    if arg == "smoke":
      assert c.model.preset == "tiny" and c.distill.enabled
      continue
    kind = trainables.select(c, loop.model_spec(c.model))
    assert isinstance(kind, DistillTrainable) and kind.lcm.guidance == 5.5
    assert c.init_from == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    assert (kind.inner is not None) == (arg == "lora") and (c.ema.rate == (None if arg == "lora" else 0.95))


def test_planner_plans_distillation_with_the_frozen_teacher():
  """`planning.plan_train` with `Workload.distill`: the distillation step compiles with the teacher as a frozen,
  sharded input (params = student + teacher), the EMA target in the optimizer group, twice the step's FLOPs."""
  from pixart_jax.models.config import get_preset
  from pixart_jax.parallel import planning
  from pixart_jax.parallel.mesh import make_mesh
  from pixart_jax.train.optimizers import OptimizerConfig

  mesh = make_mesh([("fsdp", 8)])
  adamw = OptimizerConfig.from_dict(dict(name="adamw", betas=(0.9, 0.999), eps=1e-8))
  kw = dict(dtype=jnp.float32, ema=True)
  full = planning.plan_train(planning.Workload(get_preset("tiny"), (8, 8), 8, **kw), mesh, optimizer=adamw)
  lcm = planning.plan_train(planning.Workload(get_preset("tiny"), (8, 8), 8, distill=cm.LcmConfig(), **kw), mesh,
                            optimizer=adamw)
  assert (full.what, lcm.what) == ("train", "distill")
  assert lcm.params == 2 * full.params and lcm.optimizer == full.optimizer
  assert lcm.argument >= lcm.params + lcm.optimizer + lcm.inputs and lcm.alias == full.alias  # teacher not donated
  assert lcm.flops_analytic == pytest.approx(2 * full.flops_analytic)
