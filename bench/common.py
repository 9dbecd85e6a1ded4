"""Shared helpers for the bench/ scripts: timing, a measured matmul peak, machine description (the chips' peaks
and HBM are `pixart_jax.parallel.chips`).

Timing protocol (every script): `warmup` untimed calls (the first one compiles for JAX), then `runs` timed calls;
we report the median (and min). JAX calls must end in `block_until_ready` inside the timed callable.
Both frameworks use the same thread count (torch.set_num_threads = the cores JAX's CPU client sees).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds of `runs` timed calls after `warmup` calls; `first` is the first warm-up call (compile for JAX)."""
  median: float
  min: float
  runs: int
  first: float

  def fmt(self) -> str:
    return f"{self.median * 1e3:.1f} ms (min {self.min * 1e3:.1f}, n={self.runs})"


def time_fn(fn: Callable[[], object], *, warmup: int = 1, runs: int = 3) -> Timing:
  """Calls fn `warmup` times untimed (the first call timed separately as `first`), then `runs` times timed."""
  if runs < 1:
    raise ValueError(f"runs must be >= 1, got {runs}")
  first = 0.0
  for i in range(warmup):
    t = time.perf_counter()
    fn()
    if i == 0:
      first = time.perf_counter() - t
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return Timing(statistics.median(times), min(times), runs, first)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# The instruction-set features that decide CPU matmul speed (fp32 FMA width, native bf16 dots).
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
  """The matmul-relevant flags of this CPU (from /proc/cpuinfo), e.g. 'avx2 fma avx512f avx512_bf16 amx_bf16'."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return " ".join(fl for fl in _CPU_FLAGS if fl in have) or "none of " + ",".join(_CPU_FLAGS)
  except OSError:
    pass
  return "n/a"


def loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def machine_description() -> str:
  """One line: CPU model and its matmul flags, cores, load, python/jax/torch/diffusers versions, JAX backend."""
  import jax
  parts = [f"CPU {cpu_model()} [{cpu_flags()}]", f"{os.cpu_count()} cores", f"load {loadavg()}", f"python {platform.python_version()}",
           f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})"]
  try:
    import torch
    parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  except ImportError:
    pass
  try:
    import diffusers
    parts.append(f"diffusers {diffusers.__version__}")
  except ImportError:
    pass
  flags = os.environ.get("XLA_FLAGS", "").strip()
  if flags:
    parts.append(f"XLA_FLAGS='{flags}'")
  return "; ".join(parts)


def set_torch_threads(n: int | None = None) -> int:
  """torch uses `n` threads, default as many as there are cores (what XLA's CPU client uses); returns the count.

  On a loaded machine torch's OpenMP threads lose much more than XLA's pool (spin-waiting on a busy core): there,
  compare with `--torch-threads 1` too and report both.
  """
  import torch
  n = n or os.cpu_count() or 1
  torch.set_num_threads(n)
  return n


def measured_matmul_peak(n: int = 2048, reps: int = 3) -> dict[str, float]:
  """Best-of-`reps` GFLOP/s of an n x n fp32 matmul in JAX (highest precision) and torch on this CPU."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  flops = 2.0 * n ** 3
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  ja = jnp.asarray(a)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  t_j = time_fn(lambda: mm(ja, ja).block_until_ready(), warmup=1, runs=reps).min
  ta = torch.from_numpy(a)
  with torch.inference_mode():
    t_t = time_fn(lambda: torch.matmul(ta, ta), warmup=1, runs=reps).min
  jax_g, torch_g = flops / t_j / 1e9, flops / t_t / 1e9
  return {"jax": jax_g, "torch": torch_g, "best": max(jax_g, torch_g)}


def gflops(flops: float, seconds: float) -> float:
  return flops / seconds / 1e9


def fmt_table(header: list[str], rows: list[list[object]]) -> str:
  """A markdown table."""
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    out.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(out)
