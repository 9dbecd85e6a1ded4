"""Will it fit? Compile the train step and the sampling pipeline for a mesh without the hardware, print memory and FLOPs.

    python -m pixart_jax.plan --config configs/pixart_sigma_1024_ms.py --topology v5p:2x2x1
    python -m pixart_jax.plan --config configs/pixart_sigma_512_ms.py:smoke --devices 8
    python -m pixart_jax.plan --preset sigma-xl2-1024-ms --mesh fsdp=64 --res 1024x1024
    python -m pixart_jax.plan --preset sigma-xl2-4k --mesh sequence=4 --res 4096x4096 --what sample \
        --topology v5p:2x2x1 --cost

What is planned (--what, default train,sample):
  train        the recipe's train step (train.step.jit_train_step) at the global batch.
  sample       the whole Pipeline call: the T5 encode (T5-XXL for the released models), the CFG denoising loop
               (diffusion.denoise.denoise) and the VAE decode, in tiles where the Pipeline tiles (above 2048 px,
               above 1024 px on chips under 24 GiB; models.vae_tiling); each stage with the other models' weights resident, and the pipeline's peak.
  encode, denoise, decode   one stage of it.
--config configs/FILE.py[:ARG] takes the recipe's own preset and overrides, mesh, global batch (data.batch_size),
dtype, param dtype, remat, scan, attention (model.attention), sharding rules, optimizer, EMA and grad_accum;
flags override them. A mesh size of -1 is filled from the device count (--devices, or the topology's chips).

Devices:
  default      N fake CPU devices (N = --devices, else the product of the --mesh sizes); the script sets
               XLA_FLAGS=--xla_force_host_platform_device_count=N (re-executing itself if jax already started).
               Memory is the CPU compiler's estimate of the same SPMD program (see pixart_jax.parallel.planning).
  --topology   a TPU topology such as v5e:1x1, v5p:2x2x1 (a v5p-8 host: 4 chips), v6e:2x4, compiled ahead of time
               by the TPU compiler via jax.experimental.topologies: its own memory verdicts (it refuses programs
               that exceed HBM) and, with --cost, its cost estimate. Needs libtpu importable, no TPU hardware:
               `pip install -e .[plan]`.
Output: per program and device, the arguments split into params / optimizer (+EMA) / batch, activations and
temporaries, outputs, the peak, FLOPs per step (analytic and XLA's cost analysis), and fit verdicts for v5e, v6e,
v4, H100 and v5p HBM sizes; with --cost the compiler's estimated step time and MFU. `--json` prints one JSON
document instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys

_REEXEC = "_PIXART_PLAN_REEXEC"


def _parse_mesh(text: str) -> list[tuple[str, int]]:
  out = []
  for part in filter(None, text.split(",")):
    m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
    if not m:
      raise ValueError(f"bad --mesh entry {part!r}; expected AXIS=SIZE, e.g. fsdp=8,data=2")
    out.append((m.group(1), int(m.group(2))))
  if not out:
    raise ValueError("--mesh is empty; e.g. --mesh fsdp=8")
  return out


def _parse_res(text: str) -> tuple[int, int]:
  """'WxH' pixels -> (H, W) pixels."""
  m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if not m:
    raise ValueError(f"bad --res {text!r}; expected WIDTHxHEIGHT in pixels, e.g. 1024x1024")
  w, h = int(m.group(1)), int(m.group(2))
  if w % 8 or h % 8:
    raise ValueError(f"--res {text}: width and height must be multiples of 8 (the VAE factor)")
  return h, w


def recipe_settings(config) -> dict:
  """A training recipe (`train.config_defaults.base_config` fields) -> what the planner needs, read from the same
  fields the trainer reads (`train.loop`): preset, overrides (None placeholders dropped), attention options,
  mesh, global batch, dtypes, remat, scan, sharding rules, optimizer, EMA, grad_accum."""
  from pixart_jax.models.attention_backends import AttentionOptions

  m = config.model
  return dict(
      preset=str(m.preset), overrides={k: v for k, v in dict(m.overrides).items() if v is not None},
      attention=AttentionOptions.parse(m.get("attention")),
      mesh=",".join(f"{a}={int(n)}" for a, n in config.mesh), batch=int(config.data.batch_size),
      dtype=str(m.dtype), param_dtype=str(m.param_dtype), remat=str(m.remat), scan=bool(m.get("scan", True)),
      rules=tuple(config.get("sharding_rules", ()) or ()), optimizer=dict(config.optimizer),
      ema=config.ema.rate is not None, grad_accum=int(config.grad_accum), distill=_distill(config))


def _load_config(spec: str):
  """configs/FILE.py[:ARG] -> the module's get_config(ARG) (ml_collections convention)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config {path}: no such file")
  mod_spec = importlib.util.spec_from_file_location("_plan_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config {path} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def _distill(config):
  """config.distill (enabled) -> its LcmConfig: the train plan is then latent consistency distillation."""
  distill = config.get("distill")
  if distill is None or not distill.get("enabled", False):
    return None
  from pixart_jax.train.trainables.distill import distill_config

  return distill_config(config)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m pixart_jax.plan", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", help="training recipe configs/FILE.py[:ARG]: its preset, overrides, mesh, batch, "
                  "dtype, remat, scan, attention, sharding rules, optimizer, EMA, grad_accum; flags override them")
  ap.add_argument("--preset", help="DiT preset (pixart_jax.models.config.PRESETS) when no --config names one")
  ap.add_argument("--mesh", help="mesh axes AXIS=SIZE,... over data, fsdp, tensor, sequence (e.g. fsdp=64); one "
                  "size may be -1")
  ap.add_argument("--devices", type=int, help="fake CPU device count (default: product of the mesh sizes)")
  ap.add_argument("--topology", help="TPU topology for an ahead-of-time TPU compile, e.g. v5p:2x2x1 (needs libtpu: "
                  "pip install -e .[plan])")
  ap.add_argument("--res", default=None, help="image WIDTHxHEIGHT in pixels (default: the preset's image size)")
  ap.add_argument("--batch", type=int, help="global batch: train examples / sampled images (default: the "
                  "recipe's data.batch_size, else one per data*fsdp shard)")
  ap.add_argument("--what", default="train,sample", help="comma list of train, sample (= encode, denoise, decode: "
                  "the whole Pipeline), encode, denoise, decode")
  ap.add_argument("--dtype", default=None, help="compute dtype (default: the recipe's, else bfloat16)")
  ap.add_argument("--param-dtype", default=None, help="parameter dtype (default: the recipe's, else float32)")
  ap.add_argument("--remat", default=None, help="remat policy: none, full, dots, dots_no_batch (default full)")
  ap.add_argument("--attention", default=None, help="attention backend: auto, xla, blockwise, splash, cudnn "
                  "(default: the recipe's, else auto = splash on TPU)")
  ap.add_argument("--sequence-parallel", action="store_true", default=None,
                  help="explicit sequence-parallel self-attention over the mesh's sequence axis")
  ap.add_argument("--optimizer", default=None, help="came or adamw (default: the config's, else came)")
  ap.add_argument("--ema", action="store_true", default=None, help="keep an fp32 EMA in the train state")
  ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per update (default 1)")
  ap.add_argument("--steps", type=int, default=20, help="sampler steps (DPM-Solver++; memory does not depend on it)")
  ap.add_argument("--no-guidance", action="store_true", help="sample without classifier-free guidance")
  ap.add_argument("--offload-text-encoder", action="store_true", help="--what sample: T5's weights on the device "
                  "only while encoding (Pipeline offload_text_encoder=True)")
  ap.add_argument("--vae-tile", default="auto", help="latent tile of the VAE decode: auto (as the Pipeline: 128 "
                  "above 2048 px, above 1024 px on chips under 24 GiB), none, or a size")
  ap.add_argument("--cost", action="store_true", help="add the compiler's cost estimate (FLOPs, bytes, TPU "
                  "estimated seconds -> predicted step time and MFU); compiles each program a second time unrolled")
  ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
  ap.add_argument("-v", "--verbosity", type=int, default=0, help="1 or more: a traceback with every error")
  return ap


def _setup_devices(args, mesh_spec, reexec: bool) -> None:
  """Fake CPU devices via XLA_FLAGS before jax starts its backend; if jax already runs with another device count,
  re-exec this command once (`reexec`, the command line entry) or fail with a clear error (in-process calls)."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  if args.topology:
    return
  if args.devices is None and any(s == -1 for _, s in mesh_spec):
    raise ValueError("a mesh size of -1 needs --devices")
  n = args.devices or math.prod(s for _, s in mesh_spec)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  import jax
  if jax.device_count() != n:
    if not reexec:
      raise ValueError(f"this process already runs jax with {jax.device_count()} devices, the mesh needs {n}; "
                       "run `python -m pixart_jax.plan ...` in a fresh process")
    if os.environ.get(_REEXEC):
      raise RuntimeError(f"could not get {n} fake CPU devices (have {jax.device_count()})")
    os.environ[_REEXEC] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pixart_jax.plan", *sys.argv[1:]])


def _devices(args):
  import jax
  if not args.topology:
    return jax.devices()
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(args.topology, "tpu").devices
  except RuntimeError as e:
    raise ValueError(f"--topology {args.topology}: {e} (install libtpu: `pip install -e .[plan]`; "
                     "no TPU hardware is needed for ahead-of-time compilation)") from None


def _dtype(name: str):
  import jax.numpy as jnp
  table = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "f32": jnp.float32, "float16": jnp.float16, "fp16": jnp.float16}
  if name not in table:
    raise ValueError(f"unknown dtype {name!r}; choose from {sorted(table)}")
  return table[name]


def _check_args(args) -> None:
  from pixart_jax import checks

  checks.positive("--devices", args.devices, allow_none=True)
  checks.positive("--batch", args.batch, allow_none=True)
  checks.positive("--grad-accum", args.grad_accum, allow_none=True)
  checks.positive("--steps", args.steps)


STAGES = ("encode", "denoise", "decode")


def _what(text: str) -> list[str]:
  items = [x.strip() for x in text.split(",") if x.strip()]
  bad = [x for x in items if x not in ("train", "sample") + STAGES]
  if bad or not items:
    raise ValueError(f"--what {text!r}: takes a comma list of train, sample, encode, denoise, decode")
  return items


def _tile(text: str):
  if text in ("auto", "none"):
    return None if text == "none" else "auto"
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f"--vae-tile {text!r}: expected auto, none or a positive latent tile size")
  return int(text)


def main(argv: list[str] | None = None, *, reexec: bool = False) -> list[dict]:
  """Parses `argv`, compiles, prints; returns the plans as dicts. reexec: allow restarting the process to get the
  fake device count (only for the command line entry)."""
  args = build_parser().parse_args(argv)
  _check_args(args)
  what = _what(args.what)
  tile = _tile(args.vae_tile)
  recipe = recipe_settings(_load_config(args.config)) if args.config else {}
  mesh_text = args.mesh or recipe.get("mesh")
  if mesh_text is None:
    raise ValueError("--mesh is required (e.g. --mesh fsdp=8), or a --config recipe (its `mesh`)")
  mesh_spec = _parse_mesh(mesh_text)
  _setup_devices(args, mesh_spec, reexec)

  import dataclasses

  from pixart_jax.models.attention_backends import AttentionOptions
  from pixart_jax.models.config import from_preset
  from pixart_jax.models.attention_backends import resolve
  from pixart_jax.parallel import planning, sampling_plans
  from pixart_jax.parallel.mesh import make_mesh
  from pixart_jax.train.loop import merged_rules
  from pixart_jax.train.optimizers import OptimizerConfig

  preset = args.preset or recipe.get("preset")
  if preset is None:
    raise ValueError("name the model: --preset NAME or a --config recipe")
  cfg = from_preset(str(preset), recipe.get("overrides") if not args.preset else None)
  mesh = make_mesh(mesh_spec, devices=_devices(args))
  rules = merged_rules(recipe.get("rules", ()))
  h, w = _parse_res(args.res) if args.res else (cfg.image_size, cfg.image_size)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = args.batch or recipe.get("batch") or shards
  opt = OptimizerConfig.from_dict(recipe["optimizer"]) if "optimizer" in recipe else OptimizerConfig()
  if args.optimizer:
    opt = (OptimizerConfig.from_dict(dict(name=args.optimizer, betas=(0.9, 0.999), eps=1e-8))
           if args.optimizer == "adamw" else OptimizerConfig.from_dict(dict(name=args.optimizer)))
  attention = AttentionOptions.parse(args.attention) if args.attention else recipe.get("attention",
                                                                                        AttentionOptions())
  if args.sequence_parallel:
    attention = dataclasses.replace(attention, sequence_parallel=True)
  dtype = args.dtype or recipe.get("dtype", "bfloat16")
  param_dtype = args.param_dtype or recipe.get("param_dtype", "float32")
  work = planning.Workload(
      cfg, (h // 8, w // 8), int(batch), dtype=_dtype(dtype), param_dtype=_dtype(param_dtype),
      remat=args.remat or recipe.get("remat", "full"), scan=recipe.get("scan", True),
      ema=bool(args.ema if args.ema is not None else recipe.get("ema", False)),
      grad_accum=args.grad_accum or recipe.get("grad_accum", 1),
      steps=args.steps, guidance=not args.no_guidance, attention=attention,
      distill=recipe.get("distill"))

  method = (f"TPU ahead-of-time compile for topology {args.topology} (libtpu)" if args.topology else
            f"CPU compile of the SPMD program on {mesh.devices.size} fake CPU devices")
  backend = resolve(attention, work.dtype, mesh.devices.flat[0].platform).backend.value
  header = (f"plan: {preset}{' from ' + args.config if args.config else ''} at {w}x{h} px (latent {h // 8}x{w // 8}), "
            f"global batch {batch}, compute {dtype}, params {param_dtype}, remat {work.remat}, attention {backend}"
            f"{' (sequence parallel)' if attention.sequence_parallel else ''}, optimizer {opt.name.value}; {method}")
  plans, summaries = [], []
  if not args.json:
    print(header, flush=True)

  def emit(p, kind):
    plans.append(dict(p.as_dict(), program=kind, method=method, preset=str(preset), res=[w, h], batch=int(batch),
                      attention=backend))
    if not args.json:
      print(planning.format_plan(p), flush=True)

  for item in what:
    if item == "train":
      emit(planning.plan_train(work, mesh, optimizer=opt, rules=rules, cost=args.cost), "train")
    elif item == "sample":
      stages = sampling_plans.plan_pipeline(work, mesh, tile_latent=tile, rules=rules, cost=args.cost,
                                            offload_text_encoder=args.offload_text_encoder)
      for p in stages:
        emit(p, "sample")
      summary = sampling_plans.pipeline_summary(stages)
      summaries.append(summary)
      if not args.json:
        print(sampling_plans.format_pipeline(summary), flush=True)
    else:
      t5, vae = sampling_plans.pipeline_models(cfg)
      if item == "encode":
        p = sampling_plans.plan_encode(work, mesh, t5, rules, cost=args.cost)
      elif item == "denoise":
        p = sampling_plans.plan_sample(work, mesh, rules=rules, cost=args.cost)
      else:
        p = sampling_plans.plan_decode(work, mesh, vae, sampling_plans.pipeline_tile(h, w, mesh.devices.flat) if tile == "auto" else tile,
                                       rules, cost=args.cost)
      emit(p, item)
  if args.json:
    print(json.dumps({"header": header, "plans": plans, "pipeline": summaries}, default=str))
  return plans


def run() -> None:
  """Console entry point (`pixart-plan`): errors are one `error:` line and exit code 1 (`-v 1`: traceback)."""
  from pixart_jax import cli_errors

  cli_errors.run(main, sys.argv[1:], reexec=True)


if __name__ == "__main__":
  run()
