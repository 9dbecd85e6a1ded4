"""Joining a multi-process JAX run (one process per host) from a command line's flags."""
from __future__ import annotations

import glob
import importlib.util
import logging

import jax

log = logging.getLogger(__name__)


def on_tpu_vm() -> bool:
  """True on a Cloud TPU VM: libtpu installed (`pip install jax[tpu]`) and TPU device files present (/dev/accel*
  or /dev/vfio/N). Without the device files (libtpu on a CPU machine, e.g. for `plan`), JAX's cluster
  detection would only time out."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo", required: bool = False) -> None:
  """jax.distributed.initialize with the explicit trio (GPU clusters, local CPU tests: all three or none;
  CPU processes then use `cpu_collectives`), else automatically on a Cloud TPU VM (the other workers of the
  slice are found through the TPU metadata; a single host without a cluster just runs alone). `required`: the
  caller asked for a multi-process run, so JAX's cluster detection runs anywhere and its failure is raised."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                       f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if cpu_collectives != "none":
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif required:
    jax.distributed.initialize()
  elif on_tpu_vm():
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
      log.info("jax.distributed.initialize() not used: %s", e)
