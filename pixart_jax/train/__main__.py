r"""Train or fine-tune PixArt-Sigma on a device mesh.

  python -m pixart_jax.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

The run resumes automatically from the newest checkpoint in DIR. The config is locked: overriding a key that does
not exist (a typo) is an error. Examples:

  python -m pixart_jax.train --config configs/pixart_sigma_512_ms.py:smoke --workdir /tmp/smoke
  python -m pixart_jax.train --config configs/pixart_sigma_1024_ms.py --workdir gs://b/run \
      --config.data.dir gs://b/data1024 --config.optimizer.lr=1e-5 --config.mesh="(('fsdp',-1),)"

Multi-host: on a Cloud TPU VM (libtpu installed, TPU device files present) `jax.distributed.initialize()` runs
automatically and finds the other workers of the slice; on GPU clusters or for local tests pass --coordinator_address, --num_processes and
--process_id (CPU processes then use gloo collectives).
XLA's persistent compilation cache (environment variable JAX_COMPILATION_CACHE_DIR) makes restarts compile faster.
Exit status: 0 when done or stopped by SIGTERM / preemption after saving; 1 on a non-finite loss.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_CPU_COLLECTIVES = flags.DEFINE_enum("cpu_collectives", "gloo", ["gloo", "mpi", "none"],
                                     "Cross-process collectives on the CPU backend (multi-process CPU runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _init_distributed() -> None:
  from pixart_jax.parallel import distributed

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         cpu_collectives=_CPU_COLLECTIVES.value)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _init_distributed()
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from pixart_jax.train.loop import train_and_evaluate

  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax", "orbax"):  # Orbax logs every save step at INFO through absl
    logging.getLogger(noisy).setLevel(logging.WARNING)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)  # NonFiniteLossError: `error: ...`, exit 1 (run)
  logging.info("finished at step %d%s", result.step, " (preempted: checkpoint saved)" if result.preempted else "")
  return 0


def run() -> None:
  """Console-script entry point (`pixart-train`)."""
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(lambda argv: sys.exit(main(argv))))


if __name__ == "__main__":
  run()
