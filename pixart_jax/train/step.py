"""The train step: a pure module-level function `(state, batch, null_caption, frozen) -> (state, metrics)`.

Axis legend: B batch (global), K micro-batches (gradient accumulation), M = B / K, H W latent height/width,
C latent channels, S caption tokens, Dc caption width.

One call = one optimizer update over the global batch (docs/ARCHITECTURE.md §4.2):
  key = fold_in(state.rng, state.step)                        (same stream on any mesh / process count)
  t ~ U{0..N-1}, noise ~ N(0, 1), drop ~ Bernoulli(p) for all B examples, drawn up front
  x_t = q_sample(x0, t, noise); captions of dropped examples -> the null embedding (mask unchanged)
  loss = mean over examples of IDDPM (mse + vb), the model run in its compute dtype on fp32 master weights
  grads -> clip -> optimizer -> apply; EMA (optional, fp32)
Gradient accumulation: the batch is split into K strided micro-batches (example i*K + j goes to micro-batch j, so
each device's slice splits evenly and no data moves) and `lax.scan` sums their gradients; since the noise is drawn
per example before the split, K changes only the summation order, not the loss.

`make_train_step` binds the static parts (graphdef, optimizer, schedule, settings, the trainable's params function
and objective); the loop jits the result once per bucket shape with `jit_train_step` (explicit in/out shardings, the
state donated). `frozen` is what the trainable keeps fixed (LoRA: the base weights; distillation: the teacher; full
fine-tuning: the empty tuple).

What is minimised is an `Objective`: `draw` makes the per-example random inputs up front (so grad accumulation only
changes the summation order), `loss` runs the model on one micro-batch. The default is `Iddpm` (above); a kind of
training that minimises something else (consistency distillation: `train.trainables.distill`) brings its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import einops
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixart_jax.diffusion.losses import iddpm_loss
from pixart_jax.diffusion.schedule import DiffusionSchedule
from pixart_jax.parallel.sharding import constrain
from pixart_jax.train.ema import ema_update
from pixart_jax.train.state import TrainState, global_norm

Batch = dict[str, jax.Array]
METRICS = ("loss", "loss_mse", "loss_vb", "grad_norm", "param_norm", "update_norm", "lr")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """class_dropout_prob: caption dropout (CFG training). grad_accum: micro-batches K per update.
  ema_rate: None = no EMA. learn_sigma: train the variance head with the vb term (IDDPM)."""
  class_dropout_prob: float = 0.1
  grad_accum: int = 1
  ema_rate: float | None = None
  learn_sigma: bool = True

  def __post_init__(self):
    if not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"class_dropout_prob must lie in [0, 1], got {self.class_dropout_prob}")
    if self.grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
    if self.ema_rate is not None and not 0.0 <= self.ema_rate <= 1.0:
      raise ValueError(f"ema rate must lie in [0, 1] or be None, got {self.ema_rate}")


def _micro(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (K, M, ...), example i*K + j -> [j, i]; M keeps the batch sharding."""
  x = einops.rearrange(x, "(m k) ... -> k m ...", k=k)
  return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


class Objective(Protocol):
  """What one train step minimises.

  aux_names: the names of the (scalar, float32) means `loss` returns next to the loss ("loss" among them).
  draw(key, x0, batch) -> {name: (B, ...)} every per-example input of the loss (random draws included).
  loss(params, mb, null_caption, *, graphdef, params_fn, frozen, target) -> (loss, aux) over one micro-batch `mb`
    (the drawn dict, sliced); `target` is the state's EMA (None when the run keeps none).
  """
  aux_names: tuple[str, ...]

  def draw(self, key: jax.Array, x0: jax.Array, batch: Batch) -> Batch: ...

  def loss(self, params, mb: Batch, null_caption, *, graphdef, params_fn, frozen, target) -> tuple[jax.Array, dict]:
    ...


def model_params(params, params_fn: Callable | None, frozen: Any):
  """The model's Params: `params` themselves, or `params_fn(params, frozen)` (LoRA: adapters on the base)."""
  return params if params_fn is None else params_fn(params, frozen)


@dataclasses.dataclass(frozen=True)
class Iddpm:
  """The pretraining objective: IDDPM (mse + vb) at t ~ U{0..N-1} with caption dropout (module docstring)."""
  schedule: DiffusionSchedule
  cfg: StepConfig
  aux_names: tuple[str, ...] = ("loss", "loss_mse", "loss_vb")

  def draw(self, key, x0, batch):
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (b,), 0, self.schedule.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    drop = jax.random.bernoulli(k_drop, self.cfg.class_dropout_prob, (b,))
    x_t = self.schedule.q_sample(x0, t, noise)
    return {"latents": x0, "x_t": x_t, "t": t, "noise": noise, "drop": drop, "caption": batch["caption"],
            "mask": batch["mask"]}

  def loss(self, params, mb, null_caption, *, graphdef, params_fn=None, frozen=None, target=None):
    """Mean IDDPM loss of one micro-batch and its (loss, mse, vb) means.

    params_fn: None = `params` are the model's; else the model runs on `params_fn(params, frozen)` (LoRA: the
    trained adapters applied to the frozen base weights inside the loss, so only the adapters get gradients)."""
    del target
    cfg = self.cfg
    model = nnx.merge(graphdef, model_params(params, params_fn, frozen))
    drop = mb["drop"] if cfg.class_dropout_prob > 0 else None
    out = model(mb["x_t"], mb["t"], mb["caption"], mb["mask"], caption_drop=drop,
                null_caption=null_caption if drop is not None else None, **mb.get("model_inputs", {}))
    losses = iddpm_loss(out, mb["latents"], mb["x_t"], mb["t"], mb["noise"], schedule=self.schedule,
                        learn_sigma=cfg.learn_sigma)
    aux = {"loss": jnp.mean(losses["loss"]), "loss_mse": jnp.mean(losses["mse"]), "loss_vb": jnp.mean(losses["vb"])}
    return aux["loss"], aux


def train_step(state: TrainState, batch: Batch, null_caption: jax.Array, frozen: Any = (), *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
               schedule: DiffusionSchedule, cfg: StepConfig,
               params_fn: Callable | None = None,
               objective: Objective | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update.

  Args:
    state: the train state (donated by the caller's jit).
    batch: latents (B H W C) float, caption (B S Dc), mask (B S) int; B divisible by cfg.grad_accum. Any other
      entry is a keyword input of the model (the trainable's `model_inputs`, e.g. ControlNet's control latent).
    null_caption: (S, Dc) the caption embedding of the empty prompt (CFG dropout target).
    frozen: the trainable's fixed inputs (a pytree, () for full fine-tuning); params_fn: its map (trained params,
      frozen) -> model params, None when the trained params are the model's (see `Iddpm.loss`).
    objective: what is minimised (None: `Iddpm(schedule, cfg)`).
  Returns:
    (new state, metrics): float32 scalars {the objective's aux (loss, loss_mse, loss_vb for IDDPM), grad_norm
    (before clipping), param_norm (after the update), update_norm, lr (of this update)}.
  """
  objective = objective or Iddpm(schedule, cfg)
  x0 = batch["latents"].astype(jnp.float32)
  b = x0.shape[0]
  k = cfg.grad_accum
  if b % k:
    raise ValueError(f"batch {b} is not divisible by grad_accum {k}")
  key = jax.random.fold_in(state.rng, state.step)
  full = objective.draw(key, x0, batch)
  extra = {k: v for k, v in batch.items() if k not in ("latents", "caption", "mask")}
  if extra:  # the trainable's model inputs (ControlNet: the control latent), sliced with the micro-batches
    full["model_inputs"] = extra
  grad_fn = jax.value_and_grad(
      functools.partial(objective.loss, graphdef=graphdef, params_fn=params_fn, frozen=frozen, target=state.ema),
      has_aux=True)

  if k == 1:
    (_, aux), grads = grad_fn(state.params, full, null_caption)
  else:
    micro = jax.tree.map(lambda v: _micro(v, k), full)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

    def body(carry, mb):
      g_sum, a_sum = carry
      (_, aux), g = grad_fn(state.params, mb, null_caption)
      return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, a_sum, aux)), None

    init_aux = {name: jnp.zeros([], jnp.float32) for name in objective.aux_names}
    (grads, aux), _ = jax.lax.scan(body, (zeros, init_aux), micro)
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, state.params)
    aux = jax.tree.map(lambda a: a / k, aux)

  grad_norm = global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if cfg.ema_rate is not None and ema is not None:
    ema = ema_update(ema, params, cfg.ema_rate)
  metrics = dict(aux, grad_norm=grad_norm, param_norm=global_norm(params), update_norm=global_norm(updates),
                 lr=jnp.asarray(lr_schedule(state.step), jnp.float32))
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng)
  return new_state, metrics


def make_train_step(*, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    schedule: DiffusionSchedule | None = None, cfg: StepConfig = StepConfig(),
                    params_fn: Callable | None = None, objective: Objective | None = None) -> Callable:
  """`train_step` with its static parts bound: `(state, batch, null_caption, frozen) -> (state, metrics)`."""
  return functools.partial(train_step, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                           schedule=schedule or DiffusionSchedule.linear(), cfg=cfg, params_fn=params_fn,
                           objective=objective)


def jit_train_step(step_fn: Callable, state_shardings: Any, batch_sharding: Any, mesh: jax.sharding.Mesh,
                   frozen_shardings: Any = ()):
  """jax.jit of `step_fn(state, batch, null_caption, frozen)` with explicit in/out shardings: the state donated
  (the frozen inputs never are), the null caption and the metrics replicated. Call it with all four arguments
  (frozen: () for full fine-tuning)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated, frozen_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
