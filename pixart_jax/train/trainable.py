"""What the trainer trains: a `Trainable`. The loop has one path for every kind; a kind is a file in
`train/trainables/` (full fine-tuning, LoRA, ControlNet, consistency distillation).

A kind provides
  * the initial state, by the documented resume order (`Trainable.initial_state`): the newest restorable
    checkpoint in `<workdir>/checkpoints` (onto the CURRENT mesh), else the kind's own start (`start`: weights from
    `init_from`, or a fresh init);
  * the frozen inputs of the step and their shardings (`frozen`; the empty tuple for full fine-tuning): sharded,
    never donated arguments of the one compiled step (`train.step.jit_train_step`);
  * the params function `(trained params, frozen) -> model params` (`params_fn`; None: the trained params are the
    model's), applied inside the loss so that gradients reach the trained params only;
  * what to export when the run ends (`export`; nothing for full fine-tuning, whose checkpoints are the result).
  * what the step minimises (`objective`, a `train.step.Objective`; None: the IDDPM pretraining loss) and its cost in
    model forward passes per example (`forward_passes`; 3 = forward + backward, for the logged FLOPs and MFU).
The train state (`TrainState`) holds the trained params, their optimizer state and EMA; checkpoints hold exactly it.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx

from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel.sharding import Rules
from pixart_jax.train import state as state_lib
from pixart_jax.train.checkpoint import Checkpointer

BuildFn = Callable[[jax.Array, jax.Array], state_lib.TrainState]  # (init key, train rng) -> step-0 state, pure


@dataclasses.dataclass(frozen=True)
class Context:
  """What a kind needs from the run to make its state: the experiment config (`init_from`, `seed`, `ema`, its own
  block), the model spec, the optimizer, the mesh and rules, the checkpoints and the data iterator (restored
  together with the state)."""
  config: Any
  spec: ModelSpec
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: Rules
  ckpt: Checkpointer
  iterator: Any


@dataclasses.dataclass(frozen=True)
class Initial:
  """The state the run starts from, its shardings (the restore / compile target) and where it came from."""
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  source: str


class Trainable(abc.ABC):
  """One kind of training. Subclasses implement `wanted`, `build_fn` and `start`, and override `frozen`,
  `params_fn`, `export` and `label` where they differ from full fine-tuning."""

  label: str = ""  # named after a restored checkpoint in the log ("checkpoint 3 (LoRA)"); "" for full fine-tuning
  params_fn: Callable[[Any, Any], Any] | None = None  # (trained params, frozen) -> the model's nnx.State of Params
  objective: Any = None  # a train.step.Objective; None = the IDDPM loss
  forward_passes: float = 3.0  # model forward-pass equivalents per example and step (backward = 2)
  model_inputs: tuple[str, ...] = ()  # batch keys the model takes as keyword inputs (ControlNet: "control")

  def __init__(self, config, spec: ModelSpec):
    self.config, self.spec = config, spec

  @classmethod
  @abc.abstractmethod
  def wanted(cls, config) -> bool:
    """Whether the experiment config asks for this kind."""

  @abc.abstractmethod
  def build_fn(self, ctx: Context) -> BuildFn:
    """The pure step-0 state function; its shapes are the checkpoint's (jit it with out_shardings)."""

  @abc.abstractmethod
  def start(self, ctx: Context, build: BuildFn, shardings, init_key: jax.Array,
            train_rng: jax.Array) -> tuple[state_lib.TrainState, str]:
    """(step-0 state, where it came from) when the workdir has no checkpoint."""

  def graphdef(self) -> nnx.GraphDef:
    """The graphdef the step merges the params function's output into (the DiT's; a kind that wraps the DiT,
    e.g. ControlNet, gives its wrapper's)."""
    return self.spec.split()[0]

  def frozen(self) -> tuple[Any, Any]:
    """(frozen inputs of the step, their shardings); call after `initial_state`."""
    return (), ()

  def export(self, state: state_lib.TrainState, workdir) -> Any:
    """Writes what the run produced beyond its checkpoints (process 0, at the end); returns its path or None."""
    del state, workdir
    return None

  def initial_state(self, ctx: Context) -> Initial:
    """checkpoint -> `start` (the documented resume order)."""
    init_key, train_rng = state_lib.split_key(self.config.seed)
    build = self.build_fn(ctx)
    abstract = jax.eval_shape(build, init_key, train_rng)
    shardings = state_lib.shardings_of(abstract, ctx.mesh, ctx.rules)
    resumed = ctx.ckpt.resume(state_lib.with_shardings(abstract, shardings), ctx.iterator)
    if resumed is not None:
      label = f" ({self.label})" if self.label else ""
      return Initial(resumed[0], shardings, f"checkpoint {resumed[1]}{label}")
    state, source = self.start(ctx, build, shardings, init_key, train_rng)
    return Initial(state, shardings, source)


def load_init_from(ctx: Context) -> nnx.State:
  """The Params of `config.init_from` (any source `convert.dit.load_transformer` reads) in the run's model spec,
  placed in their shardings; weak-to-strong rules: new KV-compression layers take their average init."""
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.convert.ours import kv_compress_missing

  spec = ctx.spec
  model = load_transformer(ctx.config.init_from, config=spec.cfg, dtype=spec.dtype, param_dtype=spec.param_dtype,
                           remat=spec.remat, scan=spec.scan, attention=spec.attention, mesh=ctx.mesh,
                           rules=ctx.rules, allow_missing=kv_compress_missing if spec.cfg.kv_compress_layers else None)
  _, params = nnx.split(model, nnx.Param)
  return params
