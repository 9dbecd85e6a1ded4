"""Full fine-tuning (or training from scratch): every parameter of the model is trained; nothing is frozen."""
from __future__ import annotations

import functools

import jax

from pixart_jax.train import state as state_lib
from pixart_jax.train.trainable import BuildFn, Context, Trainable, load_init_from


class FullTrainable(Trainable):
  """The state's params are the model's Params. Start: `init_from` weights (weak-to-strong rules) with a fresh
  optimizer state and EMA = params, else a fresh init (`jax.jit(init, out_shardings=...)`)."""

  @classmethod
  def wanted(cls, config) -> bool:
    return True

  def build_fn(self, ctx: Context) -> BuildFn:
    return functools.partial(state_lib.init_state, spec=self.spec, tx=ctx.tx, ema=self.config.ema.rate is not None)

  def start(self, ctx: Context, build: BuildFn, shardings, init_key, train_rng):
    if self.config.init_from:
      params = load_init_from(ctx)
      from_params = functools.partial(state_lib.state_from_params, tx=ctx.tx, ema=self.config.ema.rate is not None)
      state = jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(params, train_rng)
      return state, f"init_from {self.config.init_from}"
    return jax.jit(build, out_shardings=shardings)(init_key, train_rng), "fresh init"
