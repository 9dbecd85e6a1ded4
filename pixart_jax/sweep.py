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

import copy
import importlib.util
import json
import logging
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from pixart_jax import sweep_report, sweeps
from pixart_jax.outputs import claim_output

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file with get_sweep (FILE.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (local or gs://): one subfolder per trial.")
_TRIALS = flags.DEFINE_string("trials", "", "Trial indices to run, e.g. 0,3 or 2-5 (default: all).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the trials and their status; write nothing.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only write sweep.csv / sweep.png from the trials' logs.")
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger(__name__)
TRIAL_FILE = "sweep_trial.json"
FINISHED = ("done", "diverged")  # a rerun skips these


# ---------------------------------------------------------------------------------------------------------------
# The sweep folder
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def claim_sweep_dir(workdir, *, write: bool = True) -> epath.Path:
  """Makes `workdir` the sweep's folder before anything is written (`pixart_jax.outputs.claim_output`: new, empty
  or an earlier sweep's, which a rerun resumes); returns it. `write=False` checks only."""
  return epath.Path(claim_output(workdir, tool="sweep", resume=True, flag="--workdir", write_marker=write))


def _write_json(path: epath.Path, doc: dict) -> None:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(doc, indent=1))
  tmp.replace(path)


def trial_status(trial_dir: epath.Path) -> str:
  """done | diverged (finished: a rerun skips it) | partial (started: a rerun resumes it) | not started."""
  doc = _read_json(trial_dir / TRIAL_FILE)
  status = doc.get("status") if isinstance(doc, dict) else None
  if status in FINISHED:
    return status
  return "partial" if trial_dir.exists() and any(trial_dir.iterdir()) else "not started"


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def trial_configs(base, trials: Sequence[sweeps.Trial]) -> dict[str, Any]:
  """{trial name: config} with each trial's overrides applied to a copy of `base` (all checked before any run)."""
  out = {}
  for t in trials:
    cfg = copy.deepcopy(base)
    sweeps.apply_overrides(cfg, t.overrides, trial=t.name)
    out[t.name] = cfg
  return out


def run_sweep(base, trials: Sequence[sweeps.Trial], workdir, *, config: str, selected: str | None = None,
              train_fn: Callable | None = None, primary: bool = True) -> dict[str, str]:
  """Runs the `selected` trials (module doc) of `trials` on `base` in `workdir` and writes the report; returns
  {trial name: status} of every trial. `train_fn(config, workdir) -> RunResult` (default
  `train.loop.train_and_evaluate`)."""
  chosen = sweeps.select(trials, selected)
  configs = trial_configs(base, chosen)  # a bad key fails before anything is written
  from pixart_jax.train.config_defaults import check_config
  for name, cfg in configs.items():
    try:
      check_config(cfg)
    except ValueError as e:
      raise ValueError(f"trial {name!r}: {e}") from None
  root = claim_sweep_dir(workdir, write=primary)
  if train_fn is None:
    from pixart_jax.train.loop import train_and_evaluate as train_fn
  status = {t.name: trial_status(root / t.name) for t in trials}
  try:
    for t in chosen:
      where = root / t.name
      if status[t.name] in FINISHED:
        log.info("trial %d %s: %s, skipped", t.index, t.name, status[t.name])
        continue
      log.info("trial %d %s: %s (%s)", t.index, t.name, "resuming" if status[t.name] == "partial" else "starting",
               ", ".join(f"{k}={v!r}" for k, v in t.overrides.items()) or "base config")
      doc = {"index": t.index, "name": t.name, "overrides": t.overrides}
      if primary:
        where.mkdir(parents=True, exist_ok=True)
        _write_json(where / TRIAL_FILE, dict(doc, status="running"))
      status[t.name] = "partial"
      try:
        result = train_fn(configs[t.name], str(where))
      except FloatingPointError as e:  # train.loop.NonFiniteLossError: this trial diverged, the others go on
        log.warning("trial %d %s diverged: %s", t.index, t.name, e)
        status[t.name] = "diverged"
        if primary:
          _write_json(where / TRIAL_FILE, dict(doc, status="diverged", error=str(e)))
        continue
      if result.preempted:
        log.warning("trial %d %s stopped at step %d (preemption / SIGTERM): rerun the sweep to resume", t.index,
                    t.name, result.step)
        break
      status[t.name] = "done"
      if primary:
        _write_json(where / TRIAL_FILE, dict(doc, status="done", step=int(result.step)))
  finally:
    if primary:
      write_report(root, trials, status, title=config)
  return status


def write_report(root: epath.Path, trials: Sequence[sweeps.Trial], status: dict[str, str], *, title: str = "") -> list:
  rows = sweep_report.summarize(root, trials, status)
  sweep_report.write_csv(rows, root / "sweep.csv")
  sweep_report.plot(rows, root / "sweep.png", title=title)
  log.info("wrote %s and %s", root / "sweep.csv", root / "sweep.png")
  return rows


def describe(trials: Sequence[sweeps.Trial], chosen: Sequence[sweeps.Trial], workdir) -> str:
  """The dry run's table: index, run?, status, name, overrides."""
  root = epath.Path(workdir)
  picked = {t.name for t in chosen}
  lines = [f"{len(trials)} trials in {root} ({len(chosen)} selected):"]
  for t in trials:
    st = trial_status(root / t.name)
    action = "skip" if st in FINISHED or t.name not in picked else ("resume" if st == "partial" else "run")
    lines.append(f"  {t.index:3d}  {action:6s}  {st:11s}  {t.name}  {json.dumps(t.overrides)}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def _split_spec(spec: str) -> tuple[str, str | None]:
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def _init_distributed() -> None:
  """On a Cloud TPU VM (libtpu installed) every worker of the slice runs the sweep; JAX connects them."""
  if importlib.util.find_spec("libtpu") is None:
    return
  import jax
  try:
    jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:  # a single host without a cluster
    log.info("jax.distributed.initialize() not used: %s", e)


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
