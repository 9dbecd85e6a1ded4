"""FLOPs for training metrics: the analytic train-step count, peak FLOP/s per device kind, a measured CPU peak.

The analytic count is `pixart_jax.models.flops` (every matmul of the DiT, 2 FLOPs per multiply-add: patch embed,
timestep / caption MLPs, per block self-attn q k v out (+ the KV-compression conv), QK^T and PV over the
(compressed) keys, cross-attn q k v out, QK^T and PV over the S caption tokens, MLP, final layer). A train step is
3 x forward (backward = 2 x forward); recomputation under remat is NOT counted, so MFU here is model-FLOPs
utilisation. S is the padded caption length: all 300 tokens are computed.

Peak: dense bf16 FLOP/s per chip from `parallel.chips` (vendor figures); on a CPU (no table entry) the loop measures
an fp32 matmul chain on one device (`measure_matmul_peak`) and reports utilisation against that.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from pixart_jax.models import flops as model_flops
from pixart_jax.models.config import DiTConfig
from pixart_jax.parallel.chips import chip_of


def train_step_flops(cfg: DiTConfig, batch: int, height: int, width: int, caption_len: int | None = None) -> float:
  """Model FLOPs of one train step over `batch` examples of latent (height, width): 3 x forward, no remat."""
  return model_flops.dit_train_flops(cfg, height, width, caption_len, batch)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of `device` from `parallel.chips`, or None when the kind is unknown (or a CPU)."""
  chip = chip_of((device or jax.local_devices()[0]).device_kind)
  return None if chip is None else chip.bf16_flops


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, seconds: float = 1.0,
                        device: jax.Device | None = None) -> float:
  """Measured FLOP/s of an (n x n) @ (n x n) matmul chain on one device (the CPU's 'peak' for MFU)."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype) / n, device)

  @jax.jit
  def chain(x):
    for _ in range(8):
      x = x @ a
    return x

  chain(a).block_until_ready()
  reps, start = 0, time.perf_counter()
  while True:
    chain(a).block_until_ready()
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return reps * 8 * 2 * n**3 / elapsed


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1] (None without a peak)."""
  if not peak_per_device or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / num_devices / peak_per_device
