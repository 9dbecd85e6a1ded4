"""ControlNet training (`config.controlnet.blocks`: None, or the number N of copied blocks): the ControlNet-Half
branch (`models.controlnet`) is trained on the frozen `config.init_from` model, as the official
`train_scripts/train_controlnet.py` trains `ControlPixArtHalf` (the base's parameters have requires_grad False).

  * the base weights are the frozen input of the compiled step (sharded, never donated), not part of the state;
  * `TrainState.params` is the branch's nnx.State (copied blocks, before_proj, after_proj), so the optimizer
    state, the EMA and the checkpoints hold the branch only;
  * the start is the official initialisation: copies of base blocks 0..N-1, zero projections (the wrapper is then
    exactly the base model);
  * the step merges {base_model: frozen base, controlnet: branch} into the wrapper's graphdef and feeds it the
    batch's "control" latent (`model_inputs`; the dataset is prepared with `prepare --control ...`);
  * at the end the branch (the EMA's if kept) is written in the official key layout to
    `<workdir>/controlnet/controlnet.safetensors` (`convert.controlnet_keys.export_controlnet`);
    `load_controlnet(that file, base=load_transformer(init_from))` gives the trained ControlNet.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx

from pixart_jax.models.controlnet import ControlBranch, ControlPixArtSigma, copy_base_blocks
from pixart_jax.models.spec import abstract
from pixart_jax.parallel.sharding import state_shardings
from pixart_jax.train import state as state_lib
from pixart_jax.train.trainable import BuildFn, Context, Trainable, load_init_from

EXPORT = "controlnet/controlnet.safetensors"


def control_blocks(config) -> int | None:
  """config.controlnet.blocks, or None when the block is absent or unset."""
  c = config.get("controlnet") if hasattr(config, "get") else None
  return None if c is None else c.get("blocks")


def _branch(base, n: int, rngs: nnx.Rngs) -> ControlBranch:
  return ControlBranch(base, n, rngs=rngs)


def _fresh(init_key, train_rng, *, base_graph, base_shapes, n, tx, ema):
  """Shapes of the state (a randomly initialised branch; `start` gives the real one)."""
  base = nnx.merge(base_graph, base_shapes)
  _, params = nnx.split(_branch(base, n, nnx.Rngs(params=init_key)), nnx.Param)
  return state_lib.state_from_params(params, train_rng, tx=tx, ema=ema)


def _from_base(base_params, train_rng, *, base_graph, n, tx, ema):
  """The official start: branch blocks = copies of base blocks 0..N-1, zero projections."""
  base = nnx.merge(base_graph, base_params)
  branch = _branch(base, n, nnx.Rngs(0))
  copy_base_blocks(branch, base)
  _, params = nnx.split(branch, nnx.Param)
  return state_lib.state_from_params(params, train_rng, tx=tx, ema=ema)


def params_fn(branch_params, base_params) -> nnx.State:
  """(branch params, frozen base params) -> the wrapper's params."""
  return nnx.State({"base_model": base_params, "controlnet": branch_params})


class ControlNetTrainable(Trainable):
  """A ControlNet branch on the frozen `init_from` weights."""

  label = "ControlNet"
  model_inputs = ("control",)

  @classmethod
  def wanted(cls, config) -> bool:
    return control_blocks(config) is not None

  def __init__(self, config, spec):
    super().__init__(config, spec)
    self.blocks = int(control_blocks(config))
    if not 1 <= self.blocks < spec.cfg.depth:
      raise ValueError(f"controlnet.blocks must lie in [1, {spec.cfg.depth - 1}] for a {spec.cfg.depth}-block "
                       f"model, got {self.blocks}")
    if not config.init_from:
      raise ValueError("ControlNet training (config.controlnet) needs config.init_from: the base weights it steers")
    if config.get("lora") is not None and config.lora.get("rank") is not None:
      raise ValueError("config.controlnet and config.lora cannot be combined: set lora.rank=None")
    if config.sample.every:
      raise ValueError("the sampling grid (sample.every > 0) is not supported with config.controlnet: set "
                       "sample.every=0 and sample with Pipeline(..., controlnet=...) and control_image=")
    self.params_fn = params_fn
    self._base = self._base_shardings = None
    self._base_graph, self._base_shapes = nnx.split(abstract(spec), nnx.Param)
    self._wrapper_graph = None

  def graphdef(self) -> nnx.GraphDef:
    if self._wrapper_graph is None:
      def build():
        base = self.spec.build(nnx.Rngs(0))
        return ControlPixArtSigma(base, _branch(base, self.blocks, nnx.Rngs(1)))

      self._wrapper_graph, _ = nnx.split(nnx.eval_shape(build), nnx.Param)
    return self._wrapper_graph

  def build_fn(self, ctx: Context) -> BuildFn:
    """Loads the base weights (the frozen input)."""
    self._base = load_init_from(ctx)
    self._base_shardings = state_shardings(self._base, ctx.mesh, ctx.rules)
    return functools.partial(_fresh, base_graph=self._base_graph, base_shapes=self._base_shapes, n=self.blocks,
                             tx=ctx.tx, ema=self.config.ema.rate is not None)

  def start(self, ctx: Context, build: BuildFn, shardings, init_key, train_rng):
    from_base = functools.partial(_from_base, base_graph=self._base_graph, n=self.blocks, tx=ctx.tx,
                                  ema=self.config.ema.rate is not None)
    state = jax.jit(from_base, out_shardings=shardings)(self._base, train_rng)
    return state, f"ControlNet ({self.blocks} copied blocks) on init_from {self.config.init_from}"

  def frozen(self):
    return self._base, self._base_shardings

  def export(self, state, workdir):
    from pixart_jax.convert.controlnet_keys import export_controlnet

    params = state.ema if state.ema is not None else state.params
    base = nnx.merge(self._base_graph, self._base_shapes)
    graph, _ = nnx.split(nnx.eval_shape(lambda: _branch(base, self.blocks, nnx.Rngs(0))), nnx.Param)
    branch = nnx.merge(graph, jax.device_get(params))
    # a file already there is ours (a resumed run that finished before, in this workdir): replaced atomically
    return export_controlnet(branch, self.spec.cfg, workdir / EXPORT, overwrite=True)
