"""Will it fit? Compile the train step and the sampler for a mesh without the hardware, print memory and FLOPs.

    python -m pixart_jax.plan --preset sigma-xl2-1024-ms --mesh fsdp=64 --res 1024x1024
    python -m pixart_jax.plan --config configs/FILE.py:ARG --mesh fsdp=8,sequence=8 --res 4096x4096 --what train
    python -m pixart_jax.plan --preset sigma-xl2-4k --mesh fsdp=64 --res 4096x4096 --topology v5p:4x4x4

Devices:
  default      N fake CPU devices (N = --devices, else the product of the --mesh sizes); the script sets
               XLA_FLAGS=--xla_force_host_platform_device_count=N (re-executing itself if jax already started).
               Memory is the CPU compiler's estimate of the same SPMD program (see pixart_jax.parallel.planning).
  --topology   a TPU topology such as v5e:4x4, v5p:4x4x4, v6e:8x8, compiled ahead of time by the TPU compiler via
               jax.experimental.topologies (needs libtpu importable, e.g. `pip install -e .[tpu]`; no TPU needed).
Output: per program and device, the arguments split into params / optimizer (+EMA) / batch, activations and
temporaries, outputs, the peak, FLOPs per step (analytic and XLA's cost analysis), and fit verdicts for v5e, v6e,
v4, H100 and v5p HBM sizes. `--json` prints one JSON document instead.
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


def _get(config, *paths, default=None):
  """The first of the dotted `paths` present in a ConfigDict / dict."""
  for path in paths:
    node, ok = config, True
    for key in path.split("."):
      try:
        node = node[key] if isinstance(node, dict) else getattr(node, key)
      except (KeyError, AttributeError):
        ok = False
        break
    if ok and node is not None:
      return node
  return default


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
  if config is None or not _get(config, "distill.enabled", default=False):
    return None
  from pixart_jax.train.trainables.distill import distill_config

  return distill_config(config)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m pixart_jax.plan", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", help="experiment config configs/FILE.py[:ARG]; reads model.preset (or model.name), "
                  "model overrides, model.attention, mesh, batch size, dtype, remat and optimizer when present; "
                  "flags override it")
  ap.add_argument("--preset", help="DiT preset (pixart_jax.models.config.PRESETS) when no --config names one")
  ap.add_argument("--mesh", help="mesh axes AXIS=SIZE,... over data, fsdp, tensor, sequence (e.g. fsdp=64)")
  ap.add_argument("--devices", type=int, help="fake CPU device count (default: product of the mesh sizes)")
  ap.add_argument("--topology", help="TPU topology for an ahead-of-time TPU compile, e.g. v5p:4x4x4 (needs libtpu)")
  ap.add_argument("--res", default=None, help="image WIDTHxHEIGHT in pixels (default: the preset's image size)")
  ap.add_argument("--batch", type=int, help="global batch (default: one example per data*fsdp shard)")
  ap.add_argument("--what", default="train,sample", help="comma list of train, sample")
  ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16)")
  ap.add_argument("--param-dtype", default=None, help="parameter dtype (default float32)")
  ap.add_argument("--remat", default=None, help="remat policy: none, full, dots, dots_no_batch (default full)")
  ap.add_argument("--optimizer", default=None, help="came or adamw (default: the config's, else came)")
  ap.add_argument("--ema", action="store_true", default=None, help="keep an fp32 EMA in the train state")
  ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per update (default 1)")
  ap.add_argument("--steps", type=int, default=20, help="sampler steps (DPM-Solver++; memory does not depend on it)")
  ap.add_argument("--no-guidance", action="store_true", help="sample without classifier-free guidance")
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
    raise ValueError(f"--topology {args.topology}: {e} (install libtpu, e.g. `pip install -e .[tpu]`; "
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


def main(argv: list[str] | None = None, *, reexec: bool = False) -> list[dict]:
  """Parses `argv`, compiles, prints; returns the plans as dicts. reexec: allow restarting the process to get the
  fake device count (only for the command line entry)."""
  args = build_parser().parse_args(argv)
  _check_args(args)
  config = _load_config(args.config) if args.config else None
  mesh_text = args.mesh
  if mesh_text is None and config is not None:
    m = _get(config, "mesh", "mesh.axes")
    if m is not None:
      mesh_text = ",".join(f"{k}={v}" for k, v in (m.items() if hasattr(m, "items") else m))
  if mesh_text is None:
    raise ValueError("--mesh is required (e.g. --mesh fsdp=8), or a config with a `mesh` entry")
  mesh_spec = _parse_mesh(mesh_text)
  _setup_devices(args, mesh_spec, reexec)

  from pixart_jax.models.attention_backends import AttentionOptions
  from pixart_jax.models.config import from_preset
  from pixart_jax.parallel import planning
  from pixart_jax.parallel.mesh import make_mesh
  from pixart_jax.train.optimizers import OptimizerConfig

  preset = args.preset or (_get(config, "model.preset", "model.name", "preset") if config is not None else None)
  if preset is None:
    raise ValueError("name the model: --preset NAME or a config with model.preset")
  overrides = dict(_get(config, "model.overrides", default={}) or {}) if config is not None else {}
  attention = _get(config, "model.attention") if config is not None else None
  cfg = from_preset(str(preset), overrides)
  mesh = make_mesh(mesh_spec, devices=_devices(args))
  h, w = _parse_res(args.res) if args.res else (cfg.image_size, cfg.image_size)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = args.batch or (_get(config, "batch_size", "data.global_batch", "train.batch_size")
                         if config is not None else None) or shards
  cget = (lambda *p, default=None: _get(config, *p, default=default)) if config is not None else (
      lambda *p, default=None: default)
  opt_dict = cget("optimizer", default=None)
  opt = OptimizerConfig.from_dict(dict(opt_dict)) if opt_dict is not None else OptimizerConfig()
  if args.optimizer:
    opt = (OptimizerConfig.from_dict(dict(name=args.optimizer, betas=(0.9, 0.999), eps=1e-8))
           if args.optimizer == "adamw" else OptimizerConfig.from_dict(dict(name=args.optimizer)))
  work = planning.Workload(
      cfg, (h // 8, w // 8), int(batch),
      dtype=_dtype(args.dtype or str(cget("model.dtype", "dtype", default="bfloat16"))),
      param_dtype=_dtype(args.param_dtype or str(cget("model.param_dtype", "param_dtype", default="float32"))),
      remat=args.remat or str(cget("model.remat", "remat", default="full")),
      ema=bool(args.ema if args.ema is not None else cget("ema.rate", default=None) is not None),
      grad_accum=args.grad_accum or int(cget("grad_accum", "train.grad_accum", default=1)),
      steps=args.steps, guidance=not args.no_guidance, attention=AttentionOptions.parse(attention),
      distill=_distill(config))
  what = [x.strip() for x in args.what.split(",") if x.strip()]
  bad = [x for x in what if x not in ("train", "sample")]
  if bad or not what:
    raise ValueError(f"--what takes train and/or sample, got {args.what!r}")

  method = (f"TPU ahead-of-time compile for topology {args.topology} (libtpu)" if args.topology else
            f"CPU compile of the SPMD program on {mesh.devices.size} fake CPU devices")
  header = (f"plan: {preset} at {w}x{h} px (latent {h // 8}x{w // 8}), global batch {batch}, "
            f"compute {args.dtype or 'bfloat16'}, remat {work.remat}, optimizer {opt.name.value}; {method}")
  plans = []
  if not args.json:
    print(header, flush=True)
  for item in what:
    p = planning.plan_train(work, mesh, optimizer=opt) if item == "train" else planning.plan_sample(work, mesh)
    plans.append(dict(p.as_dict(), method=method, preset=str(preset), res=[w, h], batch=int(batch)))
    if not args.json:
      print(planning.format_plan(p), flush=True)
  if args.json:
    print(json.dumps({"header": header, "plans": plans}, default=str))
  return plans


def run() -> None:
  """Console entry point (`pixart-plan`): errors are one `error:` line and exit code 1 (`-v 1`: traceback)."""
  from pixart_jax import cli_errors

  cli_errors.run(main, sys.argv[1:], reexec=True)


if __name__ == "__main__":
  run()
