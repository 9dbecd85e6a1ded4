"""Running a sweep (the library behind `python -m pixart_jax.sweep`, whose docstring describes the behaviour): the
sweep folder and each trial's status file, running the selected trials with the trainer, and the report."""
from __future__ import annotations

import copy
import json
import logging
from typing import Any, Callable, Sequence

from etils import epath

from pixart_jax import sweep_report, sweeps
from pixart_jax.outputs import claim_output

log = logging.getLogger(__name__)
TRIAL_SUFFIX = ".trial.json"  # DIR/<trial>.trial.json: the sweep's record of a trial, beside the trainer's folder
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


def trial_file(trial_dir: epath.Path) -> epath.Path:
  """The sweep's status file of a trial: next to the trial's folder, which belongs to the trainer."""
  return trial_dir.parent / f"{trial_dir.name}{TRIAL_SUFFIX}"


def trial_status(trial_dir: epath.Path) -> str:
  """done | diverged (finished: a rerun skips it) | partial (started: a rerun resumes it) | not started."""
  doc = _read_json(trial_file(trial_dir))
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
        _write_json(trial_file(where), dict(doc, status="running"))
      status[t.name] = "partial"
      try:
        result = train_fn(configs[t.name], str(where))
      except FloatingPointError as e:  # train.loop.NonFiniteLossError: this trial diverged, the others go on
        log.warning("trial %d %s diverged: %s", t.index, t.name, e)
        status[t.name] = "diverged"
        if primary:
          _write_json(trial_file(where), dict(doc, status="diverged", error=str(e)))
        continue
      if result.preempted:
        log.warning("trial %d %s stopped at step %d (preemption / SIGTERM): rerun the sweep to resume", t.index,
                    t.name, result.step)
        break
      status[t.name] = "done"
      if primary:
        _write_json(trial_file(where), dict(doc, status="done", step=int(result.step)))
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
