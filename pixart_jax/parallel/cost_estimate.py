"""The compiler's cost estimate of a planned program: FLOPs, bytes accessed and predicted seconds -> step time, MFU.

`compiled.cost_analysis()` gives FLOPs, bytes accessed and, on TPU, `optimal_seconds` (the compiler's own roofline
time of the per-device program). XLA counts a while-loop body once (scanned layers, sampler steps), so the planner
(`parallel.planning`, `parallel.sampling_plans`) takes the estimate from a second compile of the same program with
the blocks unrolled (`scan=False`), or of ONE unit of a loop (one sampler step, one encoder layer), and `estimate`
multiplies it by the unit count. The predicted time is that estimate, MFU = analytic FLOPs / (predicted time x the
chip's bf16 peak, `parallel.chips`). It is the compiler's model, not a measurement.
"""
from __future__ import annotations

from pixart_jax.parallel import chips


def compiled_cost(compiled) -> dict | None:
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


def compiled_flops(compiled) -> float | None:
  """The FLOPs of `compiled_cost` (None when the backend reports nothing)."""
  c = compiled_cost(compiled)
  return None if c is None else c["flops"]


def estimate(raw: dict | None, scale: int, flops_analytic: float, device_kind: str, how: str) -> dict | None:
  """The compiler's estimate of one step on one device: `raw` (`compiled_cost` of the program, or of one unit of
  it) times `scale` units; predicted_seconds from the compiler's seconds, MFU = flops_analytic / (seconds x the
  chip's bf16 peak). how: which program the numbers come from (for the label)."""
  if raw is None:
    return None
  chip = chips.chip_of(device_kind)
  seconds = None if raw["seconds"] is None else raw["seconds"] * scale
  mfu = (flops_analytic / (seconds * chip.bf16_flops) if seconds and chip is not None else None)
  return dict(flops=raw["flops"] * scale, bytes=raw["bytes"] * scale, predicted_seconds=seconds, mfu=mfu,
              chip=None if chip is None else chip.name, how=how,
              label="the XLA compiler's cost-model estimate (cost_analysis), not a measurement")
