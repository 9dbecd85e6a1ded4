"""Memory and FLOP planning: lower and compile the train step / the sampler for a mesh, without running them.

Axis legend: B global batch, H W latent height/width, C latent channels, S caption tokens, Dc caption width.

`plan_train` and `plan_sample` build abstract inputs (ShapeDtypeStructs carrying their NamedShardings on `mesh`),
lower the real jitted programs (`train.step.jit_train_step`, `diffusion.denoise` as the Pipeline runs it), compile
them, and read per-device memory from `compiled.memory_analysis()` and FLOPs from `compiled.cost_analysis()`; the
analytic FLOPs come from `models.flops`. Nothing is allocated or executed. `plan_pipeline` plans the whole
`Pipeline` call: the T5 encode (`plan_encode`), the CFG denoising loop (`plan_sample`) and the VAE decode
(`plan_decode`, in tiles where the Pipeline tiles), each stage with the other models' weights resident.

The compiler's cost estimate (`cost=True`): `compiled.cost_analysis()` FLOPs, bytes accessed and, on TPU,
`optimal_seconds` (the compiler's own roofline time of the per-device program). XLA counts a while-loop body once
(scanned layers, sampler steps), so the estimate is taken from a second compile of the same program with the
blocks unrolled (`scan=False`); for sampling, of ONE sampler step (steps=1), multiplied by the step count. The
predicted time is that estimate, MFU = analytic FLOPs / (predicted time x the chip's bf16 peak, `parallel.chips`).

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
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixart_jax.models import flops as flops_lib
from pixart_jax.models.attention_backends import AttentionOptions, resolve
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.spec import ModelSpec, abstract
from pixart_jax.parallel import chips
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
  cost: the compiler's cost estimate (`cost_estimate`), None unless asked for.
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


def _abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a tree whose structure is a prefix of `tree`'s: one
  NamedSharding may stand for a whole nnx.Variable)."""
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub),
      shardings, tree)


def _cost(compiled) -> dict | None:
  """cost_analysis() of a compiled program -> {flops, bytes, seconds} (seconds: the TPU compiler's
  `optimal_seconds`, None where the backend does not report it); None when the backend reports nothing."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  seconds = cost.get("optimal_seconds")
  return dict(flops=float(cost["flops"]), bytes=float(cost.get("bytes accessed", 0.0)),
              seconds=None if seconds is None or seconds < 0 else float(seconds))


def _cost_flops(compiled) -> float | None:
  c = _cost(compiled)
  return None if c is None else c["flops"]


def cost_estimate(raw: dict | None, scale: int, flops_analytic: float, device_kind: str, how: str) -> dict | None:
  """The compiler's estimate of one step on one device: `raw` (`_cost` of the program, or of one unit of it) times
  `scale` units; predicted_seconds from the compiler's seconds, MFU = flops_analytic / (seconds x the chip's
  bf16 peak). how: which program the numbers come from (for the label)."""
  if raw is None:
    return None
  chip = chips.chip_of(device_kind)
  seconds = None if raw["seconds"] is None else raw["seconds"] * scale
  mfu = (flops_analytic / (seconds * chip.bf16_flops) if seconds and chip is not None else None)
  return dict(flops=raw["flops"] * scale, bytes=raw["bytes"] * scale, predicted_seconds=seconds, mfu=mfu,
              chip=None if chip is None else chip.name, how=how,
              label="the XLA compiler's cost-model estimate (cost_analysis), not a measurement")


def _memory(compiled, error: str | None, argument: int) -> dict[str, int]:
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


def _compile(jitted, mesh: Mesh, *args, **static) -> tuple[Any, float, str | None]:
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


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def plan_train(work: Workload, mesh: Mesh, optimizer=None, rules=sharding_lib.LOGICAL_RULES, *,
               cost: bool = False) -> Plan:
  """Compiles the real train step (`train.step`) for `mesh` on abstract inputs and reports per-device memory.

  optimizer: a `train.optimizers.OptimizerConfig` (default: CAME as in the Sigma recipe).
  Batch: latents (B H W C) f32, caption (B S Dc) f32, mask (B S) int32, sharded over the batch axes.
  cost: also compile the step with unrolled blocks for the compiler's cost estimate (`cost_estimate`).
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
    state = _abstract(abstract_state, state_lib.shardings_of(abstract_state, mesh, rules))
    objective, frozen = (LcmObjective.build(work.distill), state.params) if distill else (None, ())
    fn = step_lib.make_train_step(graphdef=graphdef, tx=tx, lr_schedule=lr, cfg=step_cfg, objective=objective)
    jitted = step_lib.jit_train_step(fn, jax.tree.map(lambda a: a.sharding, state), batch_sh, mesh,
                                     jax.tree.map(lambda a: a.sharding, frozen))
    return abstract_state, state, frozen, _compile(jitted, mesh, state, batch, null, frozen)

  abstract_state, state, frozen, (compiled, seconds, error) = compile_step(work.scan)
  args_bytes = per_device_bytes((state, batch, null, frozen))
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  total = flops_lib.dit_train_flops(cfg, h, w, s, b) * (2.0 if distill else 1.0)  # distill: + the teacher's passes
  estimate = None
  if cost and compiled is not None:
    unrolled = compiled if not work.scan else compile_step(False)[3][0]
    estimate = cost_estimate(_cost(unrolled) if unrolled is not None else None, 1, total / n, kind,
                             "the train step compiled with unrolled blocks")
  return Plan(what="distill" if distill else "train", devices=n, device_kind=kind, mesh=dict(mesh.shape),
              params=per_device_bytes(state.params) + per_device_bytes(frozen),  # distill: + the teacher
              optimizer=per_device_bytes(state.opt_state) + per_device_bytes(state.ema),
              inputs=per_device_bytes(batch) + per_device_bytes(null), **_memory(compiled, error, args_bytes),
              flops_analytic=total / n, flops_xla=_cost_flops(compiled) if compiled else None,
              compile_seconds=seconds, error=error, cost=estimate,
              total_params=_count(abstract_state.params))


def plan_sample(work: Workload, mesh: Mesh, sampler: str = "dpm-solver",
                rules=sharding_lib.LOGICAL_RULES, *, cost: bool = False) -> Plan:
  """Compiles `diffusion.denoise` as `Pipeline` runs it (CFG model fn inside the sampler's scan) for `mesh`.

  Inputs: latents (B H W C) f32, prompt and negative caption embeddings (B S Dc) f32 with masks (batch-sharded as
  the Pipeline places them), the guidance scale and the sampler key; parameters in `work.param_dtype`, compute in
  `work.dtype`. FLOPs: `work.steps` model calls at batch 2B (B without guidance).
  cost: also compile ONE sampler step with unrolled blocks; the estimate is that times `work.steps`.
  """
  from pixart_jax.diffusion.denoise import STATIC_ARGNAMES, denoise

  cfg = work.cfg
  platform = mesh.devices.flat[0].platform
  b, (h, w), s = work.global_batch, work.latent_hw, cfg.max_caption_len
  batch_sh = sharding_lib.batch_sharding(mesh, rules, (b,))  # the Pipeline's placement of every batch array
  replicated = NamedSharding(mesh, PartitionSpec())
  lat = jax.ShapeDtypeStruct((b, h, w, cfg.in_channels), jnp.float32, sharding=batch_sh)
  emb = jax.ShapeDtypeStruct((b, s, cfg.caption_channels), jnp.float32, sharding=batch_sh)
  msk = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=batch_sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
  cond, uncond = (emb, msk), ((emb, msk) if work.guidance else None)

  def compile_loop(scan: bool, steps: int):
    model = abstract(work.spec("none", platform, scan=scan))
    graphdef, params = nnx.split(model)
    params = _abstract(params, sharding_lib.state_shardings(params, mesh, rules))
    jitted = jax.jit(functools.partial(denoise, graphdef), static_argnames=STATIC_ARGNAMES)
    return model, params, _compile(jitted, mesh, params, lat, cond, uncond, scale, key, sampler=sampler,
                                   steps=steps, mode="diffusers")

  model, params, (compiled, seconds, error) = compile_loop(work.scan, work.steps)
  args_bytes = per_device_bytes((params, lat, cond, uncond, scale, key))
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  total = flops_lib.sampling_flops(cfg, h, w, work.steps, batch=b, guidance=work.guidance, caption_len=s)
  estimate = None
  if cost and compiled is not None:
    one = compile_loop(False, 1)[2][0]
    estimate = cost_estimate(_cost(one) if one is not None else None, work.steps, total / n, kind,
                             f"one sampler step compiled with unrolled blocks, x {work.steps} steps")
  inputs = per_device_bytes((lat, cond, uncond))
  return Plan(what="denoise", devices=n, device_kind=kind, mesh=dict(mesh.shape),
              params=per_device_bytes(params), optimizer=0, inputs=inputs,
              **_memory(compiled, error, args_bytes), flops_analytic=total / n,
              flops_xla=_cost_flops(compiled) if compiled else None, compile_seconds=seconds, error=error,
              cost=estimate, total_params=_count(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------------------------------
# The whole Pipeline: T5 encode, denoise, VAE decode
# ---------------------------------------------------------------------------------------------------------------
# The Pipeline decodes in overlapping latent tiles of this size above this many pixels per side (pipeline.py,
# `Pipeline.__call__`: `vae_tile_latent` auto), with an overlap of a quarter tile.
PIPELINE_TILE_LATENT = 128
PIPELINE_TILE_ABOVE_PX = 2048


def pipeline_tile(height_px: int, width_px: int) -> int | None:
  """The latent tile size the Pipeline decodes a `height_px` x `width_px` image with (None: untiled)."""
  return PIPELINE_TILE_LATENT if max(height_px, width_px) > PIPELINE_TILE_ABOVE_PX else None


def pipeline_models(cfg: DiTConfig):
  """(T5Config, VAEConfig) the Pipeline pairs with `cfg`: T5-XXL and the SDXL VAE for the 4096-wide caption
  features of the released models; a tiny T5 of the DiT's caption width and the tiny VAE otherwise (test sizes)."""
  from pixart_jax.models.t5 import T5Config
  from pixart_jax.models.vae import VAEConfig

  if cfg.caption_channels == T5Config.v1_1_xxl().d_model:
    return T5Config.v1_1_xxl(), VAEConfig.sdxl()
  heads = 4 if cfg.caption_channels % 4 == 0 else 1
  return (T5Config.tiny(d_model=cfg.caption_channels, d_kv=cfg.caption_channels // heads, num_heads=heads),
          VAEConfig.tiny())


def plan_encode(work: Workload, mesh: Mesh, t5_config, rules=sharding_lib.LOGICAL_RULES, *,
                cost: bool = False) -> Plan:
  """Compiles the T5 encoder call of the Pipeline (`TextEncoder.encode_ids`: ids and mask (B S) int32 -> (B S D)
  float32) for B prompts of `cfg.max_caption_len` tokens; parameters and compute in `work.dtype` (the Pipeline's
  `text_dtype` default), sharded by `rules`. The Pipeline runs it twice with CFG (prompts, negatives): same program.
  cost: the estimate is the scanned layer counted once, times the layer count (embedding and final norm are
  outside the loop and small)."""
  from pixart_jax.convert.t5_keys import abstract_t5

  enc = abstract_t5(t5_config, dtype=work.dtype, param_dtype=work.dtype)
  graphdef, params = nnx.split(enc)
  params = _abstract(params, sharding_lib.state_shardings(params, mesh, rules))
  b, s = work.global_batch, work.cfg.max_caption_len
  sh = sharding_lib.batch_sharding(mesh, rules, (b, s))
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sh)
  mask = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sh)
  jitted = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))
  compiled, seconds, error = _compile(jitted, mesh, params, ids, mask)
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  c = t5_config
  # per token and layer: q k v o (4 d_model x inner) + gated FF (3 d_model x d_ff) + attention (2 x 2 S inner)
  total = 2 * b * s * c.num_layers * (4 * c.d_model * c.inner_dim + 3 * c.d_model * c.d_ff + 2 * s * c.inner_dim)
  estimate = (cost_estimate(_cost(compiled), c.num_layers, total / n, kind,
                            f"the encoder's scanned layer counted once, x {c.num_layers} layers")
              if cost and compiled is not None else None)
  return Plan(what="encode", devices=n, device_kind=kind, mesh=dict(mesh.shape),
              params=per_device_bytes(params), optimizer=0, inputs=per_device_bytes((ids, mask)),
              **_memory(compiled, error, per_device_bytes((params, ids, mask))), flops_analytic=total / n,
              flops_xla=_cost_flops(compiled) if compiled else None, compile_seconds=seconds, error=error,
              cost=estimate, total_params=_count(params))


def plan_decode(work: Workload, mesh: Mesh, vae_config, tile_latent: int | None = None,
                rules=sharding_lib.LOGICAL_RULES, *, cost: bool = False) -> Plan:
  """Compiles the Pipeline's VAE decode of the B denoised latents (B H W C) f32 -> images (B H*8 W*8 3) f32, the
  VAE in float32 (the Pipeline's `vae_dtype` default) and replicated, the latents batch-sharded.

  tile_latent: None = one program over the whole latent (the Pipeline's untiled decode); else the program of one
  (tile x tile) latent tile (`models.vae_tiling.decode_tiled`), plus the full-size float32 accumulators it blends
  into (B H*8 W*8 3 and 1 H*8 W*8 1, batch-sharded) and the latents as resident bytes. FLOPs: the compiler's
  count of the decode program (no loops in it) x the tile count; cost: the same factor."""
  from pixart_jax.models import vae_tiling
  from pixart_jax.models.vae import AutoencoderKL

  vae = nnx.eval_shape(lambda: AutoencoderKL(vae_config, dtype=jnp.float32, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(vae)
  params = _abstract(params, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params))
  b, (h, w) = work.global_batch, work.latent_hw
  f, cin = vae_config.downsample_factor, vae_config.latent_channels
  batch_sh = sharding_lib.batch_sharding(mesh, rules, (b,))
  th, tw = (h, w) if tile_latent is None else (min(tile_latent, h), min(tile_latent, w))
  z = jax.ShapeDtypeStruct((b, th, tw, cin), jnp.float32, sharding=batch_sh)

  def decode(p, latents):
    model = nnx.merge(graphdef, p)
    return model.decode(model.unscale_latent(latents) if tile_latent is None else latents).astype(jnp.float32)

  compiled, seconds, error = _compile(jax.jit(decode), mesh, params, z)
  memory = _memory(compiled, error, per_device_bytes((params, z)))
  tiles = 1
  # the encoder half of the VAE is an argument the decode does not read: the compiler prunes it, the Pipeline
  # still holds it on the device
  resident = max(0, per_device_bytes((params, z)) - memory["argument"])
  if tile_latent is not None:
    overlap = tile_latent // 4
    tiles = len(vae_tiling.tile_starts(h, tile_latent, overlap)) * len(vae_tiling.tile_starts(w, tile_latent, overlap))
    # the full latents, the blend accumulator (B H*f W*f 3) and its weights (1 H*f W*f 1), all float32
    full = [(b, h, w, cin), (b, h * f, w * f, vae_config.out_channels)]
    resident += sum(per_device_bytes(jax.ShapeDtypeStruct(shp, jnp.float32, sharding=sharding_lib.batch_sharding(
        mesh, rules, shp))) for shp in full) + h * f * w * f * 4
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  xla = _cost_flops(compiled) if compiled else None
  estimate = (cost_estimate(_cost(compiled), tiles, (xla or 0.0) * tiles, kind,
                            f"the decode program x {tiles} tile(s) (MFU from the compiler's own FLOPs)")
              if cost and compiled is not None else None)
  return Plan(what="decode" if tile_latent is None else f"decode ({tiles} tiles of {tile_latent})",
              devices=n, device_kind=kind, mesh=dict(mesh.shape), params=per_device_bytes(params), optimizer=0,
              inputs=per_device_bytes(z), **memory,
              flops_analytic=(xla or 0.0) * tiles, flops_xla=xla, compile_seconds=seconds, error=error,
              resident=resident, cost=estimate, total_params=_count(params))


def plan_pipeline(work: Workload, mesh: Mesh, *, t5_config=None, vae_config=None, tile_latent: int | None | str = "auto",
                  sampler: str = "dpm-solver", rules=sharding_lib.LOGICAL_RULES, cost: bool = False) -> list[Plan]:
  """The whole `Pipeline` call at `work.latent_hw` for `work.global_batch` prompts: [encode, denoise, decode].

  Each stage's peak includes the other two models' parameters (the Pipeline keeps all three on the device);
  the pipeline's peak is the largest stage peak. t5_config / vae_config: default `pipeline_models(work.cfg)`.
  tile_latent: "auto" = as the Pipeline (`pipeline_tile`), None = untiled, or a latent tile size."""
  t5_default, vae_default = pipeline_models(work.cfg)
  t5_config, vae_config = t5_config or t5_default, vae_config or vae_default
  h, w = work.latent_hw
  f = vae_config.downsample_factor
  tile = pipeline_tile(h * f, w * f) if tile_latent == "auto" else tile_latent
  enc = plan_encode(work, mesh, t5_config, rules, cost=cost)
  den = plan_sample(work, mesh, sampler, rules, cost=cost)
  dec = plan_decode(work, mesh, vae_config, tile, rules, cost=cost)
  return with_resident([enc, den, dec])


def with_resident(stages: list[Plan]) -> list[Plan]:
  """The Pipeline's stages with each one's `resident` raised by the other stages' parameters (all three models
  stay on the device)."""
  total = sum(p.params for p in stages)
  return [dataclasses.replace(p, resident=p.resident + total - p.params) for p in stages]


def pipeline_summary(stages: list[Plan]) -> dict[str, Any]:
  """The pipeline's peak (the largest stage peak), which stage it is, verdicts and the compiler's summed estimate."""
  worst = max(stages, key=lambda p: (p.error is not None, p.peak))
  d = dict(peak=worst.peak, peak_stage=worst.what, refused=[p.what for p in stages if p.error],
           verdicts=worst.verdicts())
  costs = [p.cost for p in stages]
  if all(c is not None and c["predicted_seconds"] is not None for c in costs):
    d["predicted_seconds"] = sum(c["predicted_seconds"] for c in costs)
  return d


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


def format_pipeline(summary: dict[str, Any]) -> str:
  """One block for the whole Pipeline: its peak (the largest stage, other models resident) and the verdicts."""
  lines = [f"== pipeline: PEAK / device {summary['peak'] / 1e9:.3f} GB in {summary['peak_stage']}"
           + (f"; the compiler REFUSED {', '.join(summary['refused'])}" if summary["refused"] else ""),
           "  fits: " + ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())]
  if "predicted_seconds" in summary:
    lines.append(f"  compiler's estimate for the whole call: {summary['predicted_seconds']:.4g} s")
  return "\n".join(lines)
