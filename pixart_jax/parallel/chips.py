"""Accelerator chips in one table: dense bf16 peak FLOP/s and HBM per chip (vendor figures).

Used for MFU (`train.flops.device_peak_flops`), the planner's "will it fit" verdicts (`parallel.planning`) and the
benchmarks (`bench/`). HBM in bytes as XLA reports it (GiB; v5p: the 95.74 GiB the TPU compiler says is available).
"""
from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """name: short name (v5p, H100, ...). kinds: lower-case substrings of `jax.Device.device_kind` that identify it.
  bf16_flops: dense bf16 peak FLOP/s. hbm_bytes: HBM per chip, None when not tabulated."""
  name: str
  kinds: tuple[str, ...]
  bf16_flops: float
  hbm_bytes: float | None


# Matched in this order against the device kind (so "tpu v5 lite" is v5e before "tpu v5", which is v5p).
CHIPS: tuple[Chip, ...] = (
    Chip("v6e", ("tpu v6 lite", "tpu v6e"), 918e12, 32 * GIB),   # Trillium
    Chip("v5e", ("tpu v5 lite", "tpu v5e"), 197e12, 16 * GIB),
    Chip("v5p", ("tpu v5p", "tpu v5"), 459e12, 95.74 * GIB),     # v5p reports "TPU v5"
    Chip("v4", ("tpu v4",), 275e12, 32 * GIB),
    Chip("H200", ("h200",), 989e12, 141e9),                      # SXM, dense
    Chip("H100", ("h100",), 989e12, 80 * GIB),                   # SXM, dense (PCIe: 756e12)
    Chip("A100", ("a100",), 312e12, None),
)
BY_NAME: dict[str, Chip] = {c.name: c for c in CHIPS}


def device_memory(devices) -> float | None:
  """The smallest memory per device (bytes) among `devices` (`jax.Device`s, real or from a TPU topology) by their
  chip, or None when one is not a tabulated accelerator (a CPU) or there are none."""
  sizes = [getattr(chip_of(getattr(d, "device_kind", "")), "hbm_bytes", None) for d in devices]
  return None if not sizes or None in sizes else min(sizes)


def chip_of(device_kind: str) -> Chip | None:
  """The chip of a `jax.Device.device_kind`, or None (a CPU, an unknown accelerator)."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(k in kind for k in chip.kinds):
      return chip
  return None
