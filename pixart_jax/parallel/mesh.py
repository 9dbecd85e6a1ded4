"""Device meshes from a config: [(axis, size), ...] with at most one -1 filled from the device count."""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def resolve_axis_sizes(spec: Sequence[tuple[str, int]], num_devices: int) -> list[tuple[str, int]]:
  """Fills the one -1 so the product equals num_devices; validates names and sizes."""
  names = [n for n, _ in spec]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axes repeat: {names}")
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; use {MESH_AXES}")
  auto = [n for n, s in spec if s == -1]
  if len(auto) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {auto}")
  fixed = int(np.prod([s for _, s in spec if s != -1])) if spec else 1
  if any(s == 0 or s < -1 for _, s in spec):
    raise ValueError(f"mesh sizes must be positive or -1: {list(spec)}")
  if num_devices % fixed:
    raise ValueError(f"mesh {list(spec)} does not divide {num_devices} devices")
  out = [(n, num_devices // fixed if s == -1 else s) for n, s in spec]
  if int(np.prod([s for _, s in out])) != num_devices:
    raise ValueError(f"mesh {out} uses {int(np.prod([s for _, s in out]))} devices, {num_devices} available")
  return out


def parse_mesh(text: str, *, what: str = "--mesh") -> list[tuple[str, int]]:
  """'data=4,sequence=2' -> [("data", 4), ("sequence", 2)] (one size may be -1: all the remaining devices);
  ValueError naming `what` for anything else."""
  out = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
    if not m:
      raise ValueError(f"{what} {text!r}: bad entry {part!r}; expected AXIS=SIZE,... over {', '.join(MESH_AXES)}, "
                       "e.g. data=-1 or data=4,sequence=2")
    out.append((m.group(1), int(m.group(2))))
  if not out:
    raise ValueError(f"{what} is empty; e.g. data=-1 (data parallel over every device)")
  try:
    resolve_axis_sizes(out, 0 if any(s == -1 for _, s in out) else int(np.prod([s for _, s in out])))
  except ValueError as e:
    raise ValueError(f"{what} {text!r}: {e}") from None
  return out


def make_mesh(spec: Sequence[tuple[str, int]] = (("data", -1),), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with Auto axis types over all (or the given) devices; every axis of MESH_AXES is present (size 1 if
  not named) so logical rules can always refer to them."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = dict(resolve_axis_sizes(spec, len(devices)))
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
