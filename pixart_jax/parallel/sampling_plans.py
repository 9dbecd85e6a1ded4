"""Planning the whole `Pipeline` call: lower and compile each sampling stage for a mesh, without running it.

Axis legend: B prompts (images), H W latent height/width, C latent channels, S caption tokens, D T5 width.

`plan_pipeline` plans the whole `Pipeline` call: the T5 encode (`plan_encode`), the CFG denoising loop
(`plan_sample`: `diffusion.denoise` as the Pipeline runs it) and the VAE decode (`plan_decode`, in tiles where the
Pipeline tiles: the tile comes from the Pipeline's own rule, `parallel.sampling_layout.vae_tiling`), each stage
with the other models' weights resident. The inputs, the per-device numbers (`parallel.planning.Plan`) and what
the mesh's devices mean for them are those of `parallel.planning`; `cost=True` adds the compiler's estimate
(`parallel.cost_estimate`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixart_jax.models import flops as flops_lib
from pixart_jax.models.config import DiTConfig
from pixart_jax.models.spec import abstract
from pixart_jax.parallel import chips, cost_estimate, sampling_layout
from pixart_jax.parallel import sharding as sharding_lib
from pixart_jax.parallel.planning import (Plan, Workload, compile_on, count_params, memory_of, per_device_bytes,
                                          sharded_abstract)


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
    params = sharded_abstract(params, sharding_lib.state_shardings(params, mesh, rules))
    jitted = jax.jit(functools.partial(denoise, graphdef), static_argnames=STATIC_ARGNAMES)
    return model, params, compile_on(jitted, mesh, params, lat, cond, uncond, scale, key, sampler=sampler,
                                   steps=steps, mode="diffusers")

  model, params, (compiled, seconds, error) = compile_loop(work.scan, work.steps)
  args_bytes = per_device_bytes((params, lat, cond, uncond, scale, key))
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  total = flops_lib.sampling_flops(cfg, h, w, work.steps, batch=b, guidance=work.guidance, caption_len=s)
  estimate = None
  if cost and compiled is not None:
    one = compile_loop(False, 1)[2][0]
    raw = cost_estimate.compiled_cost(one) if one is not None else None
    estimate = cost_estimate.estimate(raw, work.steps, total / n, kind,
                                      f"one sampler step compiled with unrolled blocks, x {work.steps} steps")
  inputs = per_device_bytes((lat, cond, uncond))
  return Plan(what="denoise", devices=n, device_kind=kind, mesh=dict(mesh.shape),
              params=per_device_bytes(params), optimizer=0, inputs=inputs,
              **memory_of(compiled, error, args_bytes), flops_analytic=total / n,
              flops_xla=cost_estimate.compiled_flops(compiled) if compiled else None, compile_seconds=seconds,
              error=error, cost=estimate, total_params=count_params(nnx.state(model, nnx.Param)))


def pipeline_tile(height_px: int, width_px: int, devices=()) -> int | None:
  """The latent tile size the Pipeline decodes a `height_px` x `width_px` image with on `devices` (None: untiled):
  the Pipeline's own rule, `sampling_layout.vae_tiling` (with the small-chip rule when the devices are chips of
  less memory, `chips.device_memory`)."""
  return sampling_layout.vae_tiling(height_px, width_px, device_bytes=chips.device_memory(list(devices)))[0]


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
  params = sharded_abstract(params, sharding_lib.state_shardings(params, mesh, rules))
  b, s = work.global_batch, work.cfg.max_caption_len
  sh = sharding_lib.batch_sharding(mesh, rules, (b, s))
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sh)
  mask = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sh)
  jitted = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))
  compiled, seconds, error = compile_on(jitted, mesh, params, ids, mask)
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  c = t5_config
  # per token and layer: q k v o (4 d_model x inner) + gated FF (3 d_model x d_ff) + attention (2 x 2 S inner)
  total = 2 * b * s * c.num_layers * (4 * c.d_model * c.inner_dim + 3 * c.d_model * c.d_ff + 2 * s * c.inner_dim)
  estimate = (cost_estimate.estimate(cost_estimate.compiled_cost(compiled), c.num_layers, total / n, kind,
                                     f"the encoder's scanned layer counted once, x {c.num_layers} layers")
              if cost and compiled is not None else None)
  return Plan(what="encode", devices=n, device_kind=kind, mesh=dict(mesh.shape),
              params=per_device_bytes(params), optimizer=0, inputs=per_device_bytes((ids, mask)),
              **memory_of(compiled, error, per_device_bytes((params, ids, mask))), flops_analytic=total / n,
              flops_xla=cost_estimate.compiled_flops(compiled) if compiled else None, compile_seconds=seconds,
              error=error, cost=estimate, total_params=count_params(params))


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
  params = sharded_abstract(params, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params))
  b, (h, w) = work.global_batch, work.latent_hw
  f, cin = vae_config.downsample_factor, vae_config.latent_channels
  batch_sh = sharding_lib.batch_sharding(mesh, rules, (b,))
  th, tw = (h, w) if tile_latent is None else (min(tile_latent, h), min(tile_latent, w))
  z = jax.ShapeDtypeStruct((b, th, tw, cin), jnp.float32, sharding=batch_sh)

  def decode(p, latents):
    model = nnx.merge(graphdef, p)
    return model.decode(model.unscale_latent(latents) if tile_latent is None else latents).astype(jnp.float32)

  compiled, seconds, error = compile_on(jax.jit(decode), mesh, params, z)
  memory = memory_of(compiled, error, per_device_bytes((params, z)))
  tiles = 1
  # the encoder half of the VAE is an argument the decode does not read: the compiler prunes it, the Pipeline
  # still holds it on the device
  resident = max(0, per_device_bytes((params, z)) - memory["argument"])
  if tile_latent is not None:
    overlap = sampling_layout.vae_tiling(h * f, w * f, tile_latent=tile_latent)[1]  # the Pipeline's overlap
    tiles = len(vae_tiling.tile_starts(h, tile_latent, overlap)) * len(vae_tiling.tile_starts(w, tile_latent, overlap))
    # the full latents, the blend accumulator (B H*f W*f 3) and its weights (1 H*f W*f 1), all float32
    full = [(b, h, w, cin), (b, h * f, w * f, vae_config.out_channels)]
    resident += sum(per_device_bytes(jax.ShapeDtypeStruct(shp, jnp.float32, sharding=sharding_lib.batch_sharding(
        mesh, rules, shp))) for shp in full) + h * f * w * f * 4
  n = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  xla = cost_estimate.compiled_flops(compiled) if compiled else None
  estimate = (cost_estimate.estimate(cost_estimate.compiled_cost(compiled), tiles, (xla or 0.0) * tiles, kind,
                                     f"the decode program x {tiles} tile(s) (MFU from the compiler's own FLOPs)")
              if cost and compiled is not None else None)
  return Plan(what="decode" if tile_latent is None else f"decode ({tiles} tiles of {tile_latent})",
              devices=n, device_kind=kind, mesh=dict(mesh.shape), params=per_device_bytes(params), optimizer=0,
              inputs=per_device_bytes(z), **memory,
              flops_analytic=(xla or 0.0) * tiles, flops_xla=xla, compile_seconds=seconds, error=error,
              resident=resident, cost=estimate, total_params=count_params(params))


def plan_pipeline(work: Workload, mesh: Mesh, *, t5_config=None, vae_config=None,
                  tile_latent: int | None | str = "auto", offload_text_encoder: bool = False,
                  sampler: str = "dpm-solver", rules=sharding_lib.LOGICAL_RULES, cost: bool = False) -> list[Plan]:
  """The whole `Pipeline` call at `work.latent_hw` for `work.global_batch` prompts: [encode, denoise, decode].

  Each stage's peak includes the other models' parameters (the Pipeline keeps all three on the device; T5 only
  while encoding with `offload_text_encoder`); the pipeline's peak is the largest stage peak. t5_config /
  vae_config: default `pipeline_models(work.cfg)`. tile_latent: "auto" = as the Pipeline on the mesh's devices
  (`pipeline_tile`), None = untiled, or a latent tile size."""
  t5_default, vae_default = pipeline_models(work.cfg)
  t5_config, vae_config = t5_config or t5_default, vae_config or vae_default
  h, w = work.latent_hw
  f = vae_config.downsample_factor
  tile = pipeline_tile(h * f, w * f, mesh.devices.flat) if tile_latent == "auto" else tile_latent
  enc = plan_encode(work, mesh, t5_config, rules, cost=cost)
  den = plan_sample(work, mesh, sampler, rules, cost=cost)
  dec = plan_decode(work, mesh, vae_config, tile, rules, cost=cost)
  return with_resident([enc, den, dec], offload_text_encoder=offload_text_encoder)


def with_resident(stages: list[Plan], *, offload_text_encoder: bool = False) -> list[Plan]:
  """The Pipeline's [encode, denoise, decode] with each one's `resident` raised by the other stages' parameters
  (all three models stay on the device; with `offload_text_encoder` T5's are on it only while encoding)."""
  held = [p.params * (not (offload_text_encoder and p.what == "encode")) for p in stages]
  total = sum(held)
  return [dataclasses.replace(p, resident=p.resident + total - h) for p, h in zip(stages, held)]


def pipeline_summary(stages: list[Plan]) -> dict[str, Any]:
  """The pipeline's peak (the largest stage peak), which stage it is, verdicts and the compiler's summed estimate."""
  worst = max(stages, key=lambda p: (p.error is not None, p.peak))
  d = dict(peak=worst.peak, peak_stage=worst.what, refused=[p.what for p in stages if p.error],
           verdicts=worst.verdicts())
  costs = [p.cost for p in stages]
  if all(c is not None and c["predicted_seconds"] is not None for c in costs):
    d["predicted_seconds"] = sum(c["predicted_seconds"] for c in costs)
  return d


def format_pipeline(summary: dict[str, Any]) -> str:
  """One block for the whole Pipeline: its peak (the largest stage, other models resident) and the verdicts."""
  lines = [f"== pipeline: PEAK / device {summary['peak'] / 1e9:.3f} GB in {summary['peak_stage']}"
           + (f"; the compiler REFUSED {', '.join(summary['refused'])}" if summary["refused"] else ""),
           "  fits: " + ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())]
  if "predicted_seconds" in summary:
    lines.append(f"  compiler's estimate for the whole call: {summary['predicted_seconds']:.4g} s")
  return "\n".join(lines)
