r"""Run a sweep: the trials of a config file's `get_sweep(arg)` (see `pixart_jax/sweeps.py`), one after another.

  python -m pixart_jax.sweep --config configs/FILE.py[:ARG] --workdir DIR [--trials 0,3] [--dry_run] \
      [--config.KEY=VALUE ...]

Trial i runs `pixart_jax.train` on `get_config(ARG)` + the command line's `--config.KEY=VALUE` (every trial) + the
trial's overrides, in `DIR/<trial name>` (names from the overrides, e.g. `lr=2e-05,warmup=500`). A rerun skips
the finished trials and resumes an interrupted one from its checkpoints (the trainer's resume order). After the
runs (and when stopped), `DIR/sweep.csv` (one row per trial: status, overrides, final metrics) and `DIR/sweep.png`
(loss curves overlaid; final metrics per trial) are written from the trials' metrics.jsonl.

  --trials 0,3 / 2-5   run only these trials (the report still covers all of them); one trial per machine is how
                       launch/sweep.sh SPREAD=1 spreads a sweep over queued resources
  --dry_run            print the trials (index, name, status, overrides) and write nothing
  --report_only        write sweep.csv / sweep.png from what the trials logged so far; train nothing

DIR is claimed with the output marker (`.pixart_output.json`, `pixart_jax.outputs`) before anything is written: a new or empty folder, or one of
an earlier sweep (a rerun resumes it); any other folder is refused, nothing in it is touched.
A trial whose loss becomes non-finite is recorded as `diverged` and the sweep goes on; SIGTERM / preemption stops
the sweep after the running trial saved its checkpoint (exit 0; rerun to resume). Bad flags: one `error:` line,
exit 1.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from pixart_jax import sweeps
from pixart_jax.sweep_run import claim_sweep_dir, describe, run_sweep, trial_configs, trial_status, write_report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file with get_sweep (FILE.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (local or gs://): one subfolder per trial.")
_TRIALS = flags.DEFINE_string("trials", "", "Trial indices to run, e.g. 0,3 or 2-5 (default: all).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the trials and their status; write nothing.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write sweep.csv / sweep.png from the trials' logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _split_spec(spec: str) -> tuple[str, str | None]:
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def _init_distributed() -> None:
  """On a Cloud TPU VM every worker of the slice runs the sweep; JAX connects them (a single host without a
  cluster runs alone)."""
  from pixart_jax.parallel import distributed

  distributed.initialize()


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  spec = flags.FLAGS["config"].config_filename
  path, arg = _split_spec(spec)
  trials = sweeps.load_sweep(path, arg)
  base = _CONFIG.value
  chosen = sweeps.select(trials, _TRIALS.value)
  if _DRY_RUN.value:
    trial_configs(base, chosen)  # bad keys are reported by a dry run too
    claim_sweep_dir(_WORKDIR.value, write=False)
    print(describe(trials, chosen, _WORKDIR.value))
    return 0
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _REPORT_ONLY.value:
    root = claim_sweep_dir(_WORKDIR.value)
    rows = write_report(root, trials, {t.name: trial_status(root / t.name) for t in trials}, title=spec)
    print(f"{len(rows)} trials: {root / 'sweep.csv'}, {root / 'sweep.png'}")
    return 0
  _init_distributed()
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  status = run_sweep(base, trials, _WORKDIR.value, config=spec, selected=_TRIALS.value,
                     primary=jax.process_index() == 0)
  counts = {s: sum(v == s for v in status.values()) for s in dict.fromkeys(status.values())}
  print(f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}): "
        f"{epath.Path(_WORKDIR.value) / 'sweep.csv'}, {epath.Path(_WORKDIR.value) / 'sweep.png'}")
  return 0


def run() -> None:
  """Console-script entry point (`pixart-sweep`)."""
  from pixart_jax import cli_errors

  app.run(cli_errors.guard(lambda argv: sys.exit(main(argv))))


if __name__ == "__main__":
  run()
