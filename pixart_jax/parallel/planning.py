"""Memory and FLOP planning: lower and compile the train step for a mesh, without running it.

Axis legend: B global batch, H W latent height/width, C latent channels, S caption tokens, Dc caption width.

`plan_train` builds abstract inputs (ShapeDtypeStructs carrying their NamedShardings on `mesh`), lowers the real
jitted program (`train.step.jit_train_step`), compiles it, and reads per-device memory from
`compiled.memory_analysis()` and FLOPs from `compiled.cost_analysis()`; the analytic FLOPs come from
`models.flops`. Nothing is allocated or executed. The `Workload` / `Plan` records and the helpers here (abstract
sharded inputs, compile, memory) are shared with the sampling planner (`parallel.sampling_plans`: the whole
`Pipeline` call); `cost=True` adds the compiler's estimate (`parallel.cost_estimate`).

The mesh's devices decide what the numbers mean:
  * TPU devices from `jax.experimental.topologies.get_topology_desc` (needs libtpu, no TPU hardware): the program
    is compiled by the TPU compiler for that topology; memory is the TPU compiler's own per-device figure.
  * fake CPU devices (`--xla_force_host_platform_device_count`): the same SPMD program compiled by the CPU
    backend; argument/output sizes are exact (they follow the shardings), temporaries are the CPU compiler's
    buffer assignment, which differs from a TPU's (other fusions, bf16 dots often upcast to fp32 on the CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixart_jax.models import flops as flops_lib
from pixart_jax.models.attention_backends import AttentionOptions, resolve
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.spec import ModelSpec
from pixart_jax.parallel import chips, cost_estimate
from pixart_jax.parallel import sharding as sharding_lib

# HBM per chip (bytes, `parallel.chips`) of the accelerators the verdict is given for.
VERDICT_CHIPS = ("v5e", "v6e", "v4", "H100", "v5p")
HBM_BYTES: dict[str, float] = {name: chips.BY_NAME[name].hbm_bytes for name in VERDICT_CHIPS}
# Share of HBM a program may plan to use (the runtime, collectives' buffers and fragmentation take the rest).
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Workload:
  """What to plan. latent_hw: (H, W) latent size (image / 8). global_batch: examples per step (sampler: images,
  CFG doubles the DiT batch). dtype / param_dtype: compute / storage. remat: policy name (train only).
  attention: how attention runs (`AttentionOptions`, or a backend name / mapping of its fields).
  steps / guidance: sampler settings. ema: keep an fp32 EMA in the train state. scan: scanned blocks (as the
  recipe's `model.scan`).
  distill: None, or a `diffusion.consistency.LcmConfig`: plan latent consistency distillation (the student's state,
  the frozen teacher sharded like it, the EMA target when `ema`; `train.trainables.distill`)."""
  cfg: DiTConfig
  latent_hw: tuple[int, int]
  global_batch: int
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: str = "full"
  ema: bool = False
  grad_accum: int = 1
  steps: int = 20
  guidance: bool = True
  attention: AttentionOptions = AttentionOptions()
  distill: Any = None
  scan: bool = True

  def __post_init__(self):
    object.__setattr__(self, "attention", AttentionOptions.parse(self.attention))
    h, w = self.latent_hw
    p = self.cfg.patch_size
    if h <= 0 or w <= 0 or h % p or w % p:
      raise ValueError(f"latent size {h}x{w} must be positive multiples of the patch size {p}")
    if self.global_batch < 1:
      raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")

  def spec(self, remat: str, platform: str | None = None, scan: bool | None = None) -> ModelSpec:
    """The model as the program runs it (train: `remat`; sampling: "none", as `load_transformer` builds it), with
    attention `auto` resolved for `platform` (the mesh's devices: a TPU topology plans splash even from a CPU
    host; None: this process's backend)."""
    return ModelSpec(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, remat=remat,
                     scan=self.scan if scan is None else scan,
                     attention=resolve(self.attention, self.dtype, platform))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device numbers of one compiled program (bytes, FLOPs per step / per sampler call).

  params / optimizer / inputs: the argument bytes of each group on one device (from the shardings);
  optimizer includes the EMA. argument / output / alias / temp / code: `memory_analysis()`. peak: the bytes the
  program needs on one device = argument + output - alias + temp + code (donated outputs reuse their inputs).
  flops_analytic: models.flops for the whole step divided by the device count; flops_xla: cost_analysis() of the
  per-device program (XLA counts a while-loop body once, so scanned layers / sampler steps are undercounted).
  error: the compiler's out-of-memory refusal (TPU: "... temporaries (387.66G) exceeds available HBM (95.74G)");
  then temp is the compiler's figure from that message and output / code are unknown (0).
  resident: bytes per device of the Pipeline's other models, held on the device while this stage runs (0 for a
  train step or a stage planned alone); part of the peak.
  cost: the compiler's cost estimate (`cost_estimate.estimate`), None unless asked for.
  """
  what: str
  devices: int
  device_kind: str
  mesh: dict[str, int]
  params: int
  optimizer: int
  inputs: int
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  flops_analytic: float
  flops_xla: float | None
  compile_seconds: float
  total_params: int
  error: str | None = None
  resident: int = 0
  cost: dict | None = None

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code + self.resident

  def verdicts(self) -> dict[str, str]:
    """'fits' / 'tight' / 'no' per accelerator of HBM_BYTES (tight = above the usable fraction, below 100 %)."""
    out = {}
    for name, hbm in HBM_BYTES.items():
      frac = self.peak / hbm
      out[name] = f"{'fits' if frac <= USABLE_FRACTION else 'tight' if frac <= 1.0 else 'no'} ({100 * frac:.0f}%)"
    return out

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(peak=self.peak, verdicts=self.verdicts())
    return d


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs carrying shardings (the largest shard per leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize  # (also a PRNG key dtype's)
  return total


def sharded_abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a tree whose structure is a prefix of `tree`'s: one
  NamedSharding may stand for a whole nnx.Variable)."""
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub),
      shardings, tree)


def memory_of(compiled, error: str | None, argument: int) -> dict[str, int]:
  """memory_analysis() of a compiled program; after an out-of-memory refusal (error), the compiler's temporaries
  figure from its message and the arguments from the shardings."""
  if compiled is None:
    m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", error or "")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temp = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
    return dict(argument=argument, output=0, alias=0, temp=temp, code=0)
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend returns no memory_analysis() for compiled programs")
  return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
              alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
              code=int(m.generated_code_size_in_bytes))


def compile_on(jitted, mesh: Mesh, *args, **static) -> tuple[Any, float, str | None]:
  """(compiled or None, seconds, None or the compiler's out-of-memory message). A compiler that knows its HBM
  (TPU) refuses programs that cannot fit: that is a verdict, not a failure of the planner."""
  t = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = jitted.lower(*args, **static).compile()
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, time.perf_counter() - t, str(e).strip().splitlines()[0]
  return compiled, time.perf_counter() - t, None


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def plan_train(work: Workload, mesh: Mesh, optimizer=None, rules=sharding_lib.LOGICAL_RULES, *,
               cost: bool = False) -> Plan:
  """Compiles the real train step (`train.step`) for `mesh` on abstract inputs and reports per-device memory.

  optimizer: a `train.optimizers.OptimizerConfig` (default: CAME as in the Sigma recipe).
  Batch: latents (B H W C) f32, caption (B S Dc) f32, mask (B S) int32, sharded over the batch axes.
  cost: also compile the step with unrolled blocks for the compiler's cost estimate (`cost_estimate.estimate`).
  """
  from pixart_jax.train import optimizers, state as state_lib, step as step_lib

  cfg = work.cfg
  platform = mesh.devices.flat[0].platform
  opt_cfg = optimizer or optimizers.OptimizerConfig()
  tx, lr = optimizers.make_optimizer(opt_cfg, work.global_batch)
  b, (h, w), s = work.global_batch, work.latent_hw, cfg.max_caption_len
  shapes = {"latents": ((b, h, w, cfg.in_channels), jnp.float32), "caption": ((b, s, cfg.caption_channels),
                                                                              jnp.float32),
            "mask": ((b, s), jnp.int32)}
  batch_sh = {k: sharding_lib.batch_sharding(mesh, rules, shp) for k, (shp, _) in shapes.items()}
  batch = {k: jax.ShapeDtypeStruct(shp, dt, sharding=batch_sh[k]) for k, (shp, dt) in shapes.items()}
  null = jax.ShapeDtypeStruct((s, cfg.caption_channels), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  step_cfg = step_lib.StepConfig(class_dropout_prob=cfg.class_dropout_prob, grad_accum=work.grad_accum,
                                 ema_rate=0.9999 if work.ema else None, learn_sigma=cfg.learn_sigma)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  distill = work.distill is not None
  if distill:  # the teacher: the student's shapes, shardings and storage dtype (a frozen input of the step)
    from pixart_jax.train.trainables.distill import LcmObjective

    step_cfg = dataclasses.replace(step_cfg, class_dropout_prob=0.0, ema_rate=0.95 if work.ema else None)

  def compile_step(scan: bool):
    spec = work.spec(work.remat, platform, scan=scan)
    graphdef, _ = spec.split()
    init = functools.partial(state_lib.init_state, spec=spec, tx=tx, ema=work.ema)
    abstract_state = jax.eval_shape(init, key, key)
    state = sharded_abstract(abstract_state, state_lib.shardings_of(abstract_state, mesh, rules))
    objective, frozen = (LcmObjective.build(work.distill), state.params) if distill else (None, ())
    fn = step_lib.make_train_step(graphdef=graphdef, tx=tx, lr_schedule=lr, cfg=step_cfg, objective=objective)
    jitted = step_lib.jit_train_step(fn, jax.tree.map(lambda a: a.sharding, state), batch_sh, mesh,
                                     jax.tree.map(lambda a: a.sharding, frozen))
    return abstract_state, state, frozen, compile_on(jitted, mesh, state, batch, null, frozen)

  abstract_state, state, frozen, (compiled, seconds, error) = compile_step(work.scan)
  args_bytes = per_device_bytes((state, batch, null, frozen))
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  total = flops_lib.dit_train_flops(cfg, h, w, s, b) * (2.0 if distill else 1.0)  # distill: + the teacher's passes
  estimate = None
  if cost and compiled is not None:
    unrolled = compiled if not work.scan else compile_step(False)[3][0]
    raw = cost_estimate.compiled_cost(unrolled) if unrolled is not None else None
    estimate = cost_estimate.estimate(raw, 1, total / n, kind, "the train step compiled with unrolled blocks")
  return Plan(what="distill" if distill else "train", devices=n, device_kind=kind, mesh=dict(mesh.shape),
              params=per_device_bytes(state.params) + per_device_bytes(frozen),  # distill: + the teacher
              optimizer=per_device_bytes(state.opt_state) + per_device_bytes(state.ema),
              inputs=per_device_bytes(batch) + per_device_bytes(null), **memory_of(compiled, error, args_bytes),
              flops_analytic=total / n, flops_xla=cost_estimate.compiled_flops(compiled) if compiled else None,
              compile_seconds=seconds, error=error, cost=estimate,
              total_params=count_params(abstract_state.params))


def format_plan(p: Plan) -> str:
  """A human-readable block: memory per device by group, FLOPs, verdicts."""
  def gb(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
      if abs(x) >= div:
        return f"{x / div:8.2f} {unit}"
    return f"{x:8.0f} B "

  other = p.argument - p.params - p.optimizer - p.inputs
  lines = [
      f"== {p.what}: {p.devices} x {p.device_kind}, mesh {p.mesh}, compiled in {p.compile_seconds:.1f} s",
      f"  parameters total          {p.total_params:,d}",
      f"  params         / device   {gb(p.params)}",
      f"  optimizer(+ema)/ device   {gb(p.optimizer)}",
      f"  batch inputs   / device   {gb(p.inputs)}",
      f"  other args     / device   {gb(max(other, 0))}"
      + ("" if other >= 0 else f" (unused arguments the compiler pruned: {gb(-other).strip()}, counted resident)"),
      f"  activations+temps/device  {gb(p.temp)}",
      f"  outputs        / device   {gb(p.output)} ({gb(p.alias).strip()} aliased to donated inputs)",
      f"  generated code            {gb(p.code)}",
      f"  PEAK           / device   {gb(p.peak)}",
      f"  FLOPs / device (analytic) {p.flops_analytic:.4g}"
      + ("" if p.flops_xla is None else f"   (XLA cost_analysis {p.flops_xla:.4g}, loop bodies counted once)"),
      "  fits: " + ", ".join(f"{k} {v}" for k, v in p.verdicts().items()),
  ]
  if p.resident:
    lines.insert(-3, f"  other models resident/dev  {gb(p.resident)}")
  if p.cost:
    c = p.cost
    t = "n/a" if c["predicted_seconds"] is None else f"{c['predicted_seconds']:.4g} s"
    mfu = "" if c["mfu"] is None else f", MFU {100 * c['mfu']:.1f} % of the {c['chip']} bf16 peak"
    lines.append(f"  compiler's estimate: {t} per call{mfu}; {c['flops']:.4g} FLOPs, {gb(c['bytes']).strip()} "
                 f"accessed ({c['how']}; {c['label']})")
  if p.error:
    lines.insert(1, f"  COMPILER REFUSED (out of memory): {p.error}")
  return "\n".join(lines)
