"""Latent consistency distillation (`config.distill.enabled`): LCM, or LCM-LoRA with `config.lora.rank` set.

As PixArt-LCM distilled PixArt-alpha (official `train_scripts/train_pixart_lcm.py` / `train_pixart_lcm_lora.py`;
the arithmetic is `diffusion.consistency`):

  * the teacher is `config.init_from` (released weights, a `convert` Orbax dir or a run's workdir), loaded once in
    the run's model spec and sharded like the student; it is the frozen input of the one compiled step (sharded,
    never donated), never part of the train state or the checkpoints;
  * LCM: the student starts as a copy of the teacher and every parameter trains; the target network is the state's
    EMA (`config.ema.rate`, PixArt-LCM: 0.95), so the checkpoints (params + EMA + optimizer) hold exactly the
    student and the target. Without an EMA the target is the student itself under stop-gradient;
  * LCM-LoRA: LoRA adapters (`config.lora`) on the teacher's weights are trained (the base of the adapters IS the
    teacher: the frozen input serves both); the target is the adapted model under stop-gradient (the official
    LCM-LoRA script keeps no EMA), or the EMA of the adapters when `config.ema.rate` is set. At the end the adapters
    are written in our layout (`<workdir>/lora/`, `lora.load_lora`) and in the PEFT / diffusers layout
    (`<workdir>/lora_peft/`: adapter_model.safetensors + adapter_config.json for PixArtTransformer2DModel,
    `peft.PeftModel.from_pretrained(transformer, dir)`);
  * guidance is FIXED (`config.distill.guidance`, the CFG scale s; PixArt-LCM's w = 4.5 is s = 5.5) and baked into
    the student, with no w-embedding: PixArt-LCM did so, it keeps the DiT's architecture and checkpoint layout
    unchanged (the distilled weights load wherever PixArt weights load, the LoRA is a plain LoRA of
    PixArtTransformer2DModel, diffusers' PixArt pipelines have no guidance-embedding input), and a few-step model
    is sampled at one guidance anyway. A w range with an embedding (LCM-SD's w ~ U[w_min, w_max]) would add a new
    module to the DiT;
  * no caption dropout (PixArt-LCM sets class_dropout_prob = 0): the teacher's unconditional branch is the null
    caption under the prompt's mask, the uncond branch as CFG-dropout training saw it (official `y_embedding`).
Sample the result with the LCM sampler (`sample --sampler lcm --guidance 1`, 2-8 steps).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pixart_jax import lora
from pixart_jax.diffusion import consistency as cm
from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.parallel.sharding import state_shardings
from pixart_jax.train import state as state_lib
from pixart_jax.train.step import model_params
from pixart_jax.train.trainable import BuildFn, Context, Trainable, load_init_from
from pixart_jax.train.trainables import lora as lora_train


def distill_config(config) -> cm.LcmConfig | None:
  """config.distill -> LcmConfig (None when the block is absent or `enabled` is False)."""
  c = config.get("distill") if hasattr(config, "get") else None
  if c is None or not c.get("enabled"):
    return None
  kw = {k: c[k] for k in ("guidance", "num_ddim_timesteps", "loss", "huber_c", "timestep_scaling")
        if c.get(k) is not None}
  if "num_ddim_timesteps" in kw and not 1 <= kw["num_ddim_timesteps"] <= 1000:
    raise ValueError(f"distill.num_ddim_timesteps must lie in [1, 1000], got {kw['num_ddim_timesteps']}")
  return cm.LcmConfig(**kw)


@dataclasses.dataclass(frozen=True)
class LcmObjective:
  """The consistency distillation loss (`train.step.Objective`); `frozen` is the teacher's nnx.State of Params.

  draw: j ~ U{0..n_ddim-1}, noise ~ N(0, 1), x_start = q_sample(x0, t_j, noise).
  loss: d(f_student(x_start, t_j), f_target(DDIM_teacher(x_start), t_j - k)), mean over the micro-batch."""
  lcm: cm.LcmConfig
  schedule: DiffusionSchedule
  tables: cm.SolverTables
  aux_names: tuple[str, ...] = ("loss", "teacher_step_norm")

  @classmethod
  def build(cls, lcm: cm.LcmConfig, schedule: DiffusionSchedule | None = None):
    schedule = schedule or DiffusionSchedule.linear()
    return cls(lcm, schedule, cm.SolverTables.build(schedule, lcm.num_ddim_timesteps, lcm.timestep_scaling))

  def draw(self, key, x0, batch):
    b = x0.shape[0]
    k_index, k_noise = jax.random.split(key)
    index = jax.random.randint(k_index, (b,), 0, self.lcm.num_ddim_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    start = jnp.asarray(self.tables.start, jnp.int32)[index]
    return {"index": index, "x_start": self.schedule.q_sample(x0, start, noise), "caption": batch["caption"],
            "mask": batch["mask"]}

  def loss(self, params, mb, null_caption, *, graphdef, params_fn=None, frozen=None, target=None):
    tb, idx, x = self.tables, mb["index"], mb["x_start"]
    c = x.shape[-1]
    cap, mask = mb["caption"], mb["mask"]
    t_start = jnp.asarray(tb.start, jnp.int32)[idx]
    t_end = jnp.asarray(tb.end, jnp.int32)[idx]
    at = lambda *names: [tb.take(n, idx) for n in names]  # noqa: E731

    def eps(state, x_in, t_in, cap_in, mask_in, drop=None):
      out = nnx.merge(graphdef, state)(x_in, t_in, cap_in, mask_in, caption_drop=drop,
                                       null_caption=None if drop is None else null_caption)
      return out[..., :c].astype(jnp.float32)

    # Teacher: one DDIM step under CFG, [uncond, cond] in one forward over 2B (uncond = the null caption).
    b = x.shape[0]
    teacher = jax.lax.stop_gradient(frozen)
    both = eps(teacher, jnp.concatenate([x, x]), jnp.concatenate([t_start, t_start]),
               jnp.concatenate([cap, cap]), jnp.concatenate([mask, mask]),
               drop=jnp.arange(2 * b) < b)
    e_u, e_c = both[:b], both[b:]
    e_g = e_u + self.lcm.guidance * (e_c - e_u)
    x_prev = cm.ddim_step(x, e_g, *at("sa_start", "s1m_start", "sa_prev", "s1m_prev"))
    # Target: the EMA network (or the student, stop-gradient) at the end of the step.
    tgt_params = jax.lax.stop_gradient(model_params(params if target is None else target, params_fn, frozen))
    want = cm.consistency(x_prev, eps(tgt_params, x_prev, t_end, cap, mask),
                          *at("sa_end", "s1m_end", "c_skip_end", "c_out_end"))
    # Student at the start.
    got = cm.consistency(x, eps(model_params(params, params_fn, frozen), x, t_start, cap, mask),
                         *at("sa_start", "s1m_start", "c_skip_start", "c_out_start"))
    loss = jnp.mean(cm.distance(got, jax.lax.stop_gradient(want), self.lcm.loss, self.lcm.huber_c))
    step_norm = jnp.sqrt(jnp.mean(jnp.square(x_prev - x)))
    return loss, {"loss": loss, "teacher_step_norm": step_norm}


def _copy(tree: Any, shardings: Any) -> Any:
  """A copy of `tree` in new buffers (the student must never alias the teacher: the step donates the state)."""
  def one(s, v):
    return v.replace(jax.device_put(v.get_value(), s, may_alias=False))

  return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class DistillTrainable(Trainable):
  """LCM (every parameter) or LCM-LoRA (adapters) distillation of the `init_from` teacher."""

  forward_passes = 6.0  # student forward + backward (3), teacher over 2B (2), target (1)

  @classmethod
  def wanted(cls, config) -> bool:
    return distill_config(config) is not None

  def __init__(self, config, spec):
    super().__init__(config, spec)
    self.lcm = distill_config(config)
    if not config.init_from:
      raise ValueError("distillation (config.distill.enabled) needs config.init_from: the teacher's weights")
    self.inner = lora_train.LoraTrainable(config, spec) if lora_train.lora_config(config) is not None else None
    self.label = "LCM-LoRA" if self.inner is not None else "LCM"
    self.params_fn = self.inner.params_fn if self.inner is not None else None
    self.objective = LcmObjective.build(self.lcm)
    self._teacher = self._teacher_shardings = None

  def build_fn(self, ctx: Context) -> BuildFn:
    """Loads the teacher (the frozen input; LCM-LoRA: also the adapters' base)."""
    if self.inner is not None:
      return self.inner.build_fn(ctx)
    self._teacher = load_init_from(ctx)
    self._teacher_shardings = state_shardings(self._teacher, ctx.mesh, ctx.rules)
    return functools.partial(state_lib.init_state, spec=self.spec, tx=ctx.tx, ema=self.config.ema.rate is not None)

  def start(self, ctx: Context, build: BuildFn, shardings, init_key, train_rng):
    what = (f"guidance {self.lcm.guidance}, {self.lcm.num_ddim_timesteps}-step skipping grid, {self.lcm.loss} loss, "
            f"teacher {self.config.init_from}")
    if self.inner is not None:
      state, _ = self.inner.start(ctx, build, shardings, init_key, train_rng)
      return state, f"LCM-LoRA rank {self.inner.cfg.rank} ({what})"
    from_params = functools.partial(state_lib.state_from_params, tx=ctx.tx, ema=self.config.ema.rate is not None)
    student = _copy(self._teacher, self._teacher_shardings)
    state = jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(student, train_rng)
    return state, f"LCM student = teacher ({what})"

  def frozen(self):
    return self.inner.frozen() if self.inner is not None else (self._teacher, self._teacher_shardings)

  def export(self, state, workdir):
    """LCM-LoRA: the adapters in our layout (`lora/`) and the PEFT / diffusers layout (`lora_peft/`)."""
    if self.inner is None:
      return None
    ours = self.inner.export(state, workdir)
    adapters, cfg = lora.load_lora(ours)
    peft = lora.save_peft_lora(adapters, cfg, self.spec.cfg, workdir / "lora_peft")
    return f"{ours} and {peft}"
