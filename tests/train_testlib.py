"""Shared pieces of the training tests: the smoke config, a persistent XLA cache, subprocess runs of the CLI.

Every training test compiles the same few programs (tiny model, fp32, FSDP over the fake devices). A persistent
compilation cache in a per-session directory makes the second and later compilations of an identical program a
disk read, in this process and in the subprocesses (which get the same cache and XLA settings through the
environment), so the whole set stays within a few minutes on 2 cores.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "pixart_sigma_512_ms.py"
MESH_FSDP = (("fsdp", -1),)


def smoke_config(**overrides):
  """The 512-MS recipe at smoke size, FSDP over all devices; `overrides` as dotted keys (`optimizer.lr`)."""
  spec = importlib.util.spec_from_file_location("_recipe", RECIPE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.mesh = MESH_FSDP
  c.update_from_flattened_dict(overrides)
  return c


@contextlib.contextmanager
def fast_compiles(cache_dir: str | os.PathLike):
  """Persistent compilation cache in `cache_dir` + `jax_disable_most_optimizations`; restored afterwards."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes", "jax_disable_most_optimizations")
  old = {n: getattr(jax.config, n) if hasattr(jax.config, n) else jax.config.read(n) for n in names}
  new = dict(zip(names, (str(cache_dir), 0.0, 0, True)))
  for n, v in new.items():
    jax.config.update(n, v)
  cc.reset_cache()
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    cc.reset_cache()


def subprocess_env(cache_dir: str | os.PathLike, devices: int) -> dict:
  """Environment of a CLI subprocess: `devices` fake CPU devices and the tests' XLA settings and cache."""
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      JAX_DEFAULT_MATMUL_PRECISION="highest", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
      PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def cli_args(workdir, *overrides: str, recipe: pathlib.Path = RECIPE) -> list[str]:
  """`python -m pixart_jax.train` for the smoke recipe with FSDP; `overrides` are `--config.KEY=VALUE` strings."""
  return [sys.executable, "-m", "pixart_jax.train", f"--config={recipe}:smoke", f"--workdir={workdir}",
          "--config.mesh=(('fsdp',-1),)", *overrides]


def run_cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (jax.distributed coordinator of the multi-process tests)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def assert_matches_diffusers(ours, pipeline_dir, *, prompt: str = "a cat on a sofa", size: int = 256,
                             steps: int = 5, guidance: float = 4.5, tol: int = 2):
  """`ours` (a pixart_jax.Pipeline) and diffusers' PixArtSigmaPipeline loaded from `pipeline_dir` (fp32) draw
  `prompt` from the same initial latents (seed 0) within `tol` uint8 levels; returns (our images, the latents)."""
  import numpy as np
  import torch
  from diffusers import PixArtSigmaPipeline

  ref = PixArtSigmaPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.float32)
  ref.set_progress_bar_config(disable=True)
  lat = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)
  want = ref([prompt], height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
             latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()), output_type="np", clean_caption=False).images
  want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
  got = ours([prompt], height=size, width=size, steps=steps, guidance_scale=guidance, latents=lat)
  assert np.abs(got.astype(int) - want.astype(int)).max() <= tol
  return got, lat


def run_demo(work: pathlib.Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
  """`python -m pixart_jax.demo --workdir WORK ARGS` on one CPU device, as `make demo` runs it."""
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "pixart_jax.demo", "--workdir", str(work), *args],
                        capture_output=True, text=True, env=env, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads((work / "demo_report.json").read_text())
