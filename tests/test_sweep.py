"""Sweeps: the get_sweep builders and names, and a smoke sweep of 3 trials over the demo's digits data (the shared
trained demo's prepared dataset, read only) interrupted in its third trial and rerun: only that trial runs again,
resumed from its checkpoint; sweep.csv has 3 rows and sweep.png a plot."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixart_jax import outputs, sweeps
from pixart_jax import sweep_run as sweep
from pixart_jax.sweep_report import read_curve

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.py"


# ------------------------------------------------------------------ definitions (no training)
def test_builders_and_trial_names():
  lr = sweeps.values("config.optimizer.lr", [1e-4, 2e-5])
  assert lr == [{"optimizer.lr": 1e-4}, {"optimizer.lr": 2e-5}]
  grid = sweeps.product(lr, sweeps.values("optimizer.warmup", [0, 100, 500]))
  assert len(grid) == 6 and grid[1] == {"optimizer.lr": 1e-4, "optimizer.warmup": 100}
  pairs = sweeps.zipped(lr, sweeps.values("seed", [1, 2]))
  assert pairs == [{"optimizer.lr": 1e-4, "seed": 1}, {"optimizer.lr": 2e-5, "seed": 2}]
  trials = sweeps.trials_of(grid)
  assert [t.name for t in trials[:2]] == ["lr=0.0001,warmup=0", "lr=0.0001,warmup=100"]
  assert sweeps.trial_name({"data.batch_size": 8, "sample.batch_size": 4, "mesh": (("data", -1),)}) == \
      "data.batch_size=8,sample.batch_size=4,mesh=datax-1"  # colliding leaves keep their path
  assert sweeps.trial_name({}) == "base"
  assert [t.index for t in sweeps.select(trials, "0,3-4")] == [0, 3, 4]
  with pytest.raises(ValueError, match="zipped sweeps must have equal lengths, got \\[2, 3\\]"):
    sweeps.zipped(lr, sweeps.values("seed", [1, 2, 3]))
  with pytest.raises(ValueError, match="'optimizer.lr' is set twice"):
    sweeps.product(lr, lr)
  with pytest.raises(ValueError, match="trials 0 and 1 have the same name"):
    sweeps.trials_of([{"seed": 1}, {"seed": 1}])
  with pytest.raises(ValueError, match="--trials '7': '7' is outside the sweep's trials 0-5"):
    sweeps.select(trials, "7")
  with pytest.raises(ValueError, match="--trials 'a': 'a' is not an index"):
    sweeps.select(trials, "a")


def test_shipped_recipes_define_sweeps_that_apply():
  """configs/demo.py and the 512 px recipe: their trials apply to their configs (locked: a typo is an error)."""
  import importlib.util

  for path, arg, n in ((DEMO_CONFIG, "smoke", 3), (DEMO_CONFIG, None, 6),
                       (ROOT / "configs" / "pixart_sigma_512_ms.py", None, 6)):
    spec = importlib.util.spec_from_file_location("_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trials = sweeps.load_sweep(path, arg)
    assert len(trials) == n, path
    configs = sweep.trial_configs(module.get_config(arg), trials)
    for t in trials:
      assert configs[t.name].optimizer.lr == t.overrides["optimizer.lr"]
  base = module.get_config(None)
  base.lock()
  with pytest.raises(ValueError, match=r"trial 'x': config has no field 'optimizer.lrr'; optimizer has \["):
    sweeps.apply_overrides(base, {"optimizer.lrr": 1.0}, trial="x")
  with pytest.raises(ValueError, match=r"config has no field 'optimizr' \(sweep key 'optimizr.lr'\)"):
    sweeps.apply_overrides(base, {"optimizr.lr": 1.0})


def test_report_reads_resumed_logs_and_draws_eval_metrics(tmp_path):
  """A resumed run logs some steps twice (the last record wins) and may end on a torn line; final metrics include
  whatever the trainer logged; an FID metric gets its own bar panel."""
  from pixart_jax import sweep_report

  trials = sweeps.trials_of(sweeps.values("optimizer.lr", [1e-3, 1e-4]))
  a, b = tmp_path / trials[0].name, tmp_path / trials[1].name
  a.mkdir()
  b.mkdir()
  lines = [{"step": s, "time": 0.0, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 41)]
  lines += [{"step": 40, "time": 1.0, "loss": 0.5, "lr": 1e-3, "eval/fid": 12.5}]  # step 40 again, after a resume
  (a / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 41, "lo')
  (b / "metrics.jsonl").write_text(json.dumps({"step": 3, "time": 0.0, "loss": float("nan"), "lr": 1e-4}) + "\n")
  assert [r["step"] for r in sweep_report.read_curve(a / "metrics.jsonl")] == list(range(1, 41))
  rows = sweep_report.summarize(tmp_path, trials, {trials[0].name: "done"})
  assert rows[0]["status"] == "done" and rows[1]["status"] == "not started" and rows[0]["step"] == 40
  assert rows[0]["final_loss"] == 0.5 and rows[0]["final_eval/fid"] == 12.5 and rows[0]["min_loss"] == 1.0 / 39
  assert rows[1]["min_loss"] is None and rows[1]["optimizer.lr"] == 1e-4
  sweep_report.write_csv(rows, tmp_path / "sweep.csv")
  header = (tmp_path / "sweep.csv").read_text().splitlines()[0].split(",")
  assert header[:5] == ["index", "name", "status", "step", "optimizer.lr"] and "final_eval/fid" in header
  sweep_report.plot(rows, tmp_path / "with_fid.png")
  sweep_report.plot([{k: v for k, v in r.items() if k != "final_eval/fid"} for r in rows], tmp_path / "loss.png")
  h_fid = Image.open(tmp_path / "with_fid.png").size[1]
  h_loss = Image.open(tmp_path / "loss.png").size[1]
  assert h_fid > h_loss  # one more panel (final eval/fid)


# ------------------------------------------------------------------ the smoke sweep
def _demo_base(data_dir):
  import importlib.util

  spec = importlib.util.spec_from_file_location("_demo_cfg", DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.data.dir = str(data_dir)
  c.lock()
  return c


def _cli(*args, cwd=ROOT):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "pixart_jax.sweep", *args], capture_output=True, text=True,
                        timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_smoke_sweep_interrupted_after_two_trials_reruns_only_the_rest(trained_demo_dir, tmp_path):
  from pixart_jax.train.loop import train_and_evaluate

  data = trained_demo_dir / "data"
  base = _demo_base(data)
  trials = sweeps.load_sweep(DEMO_CONFIG, "smoke")
  assert len(trials) == 3
  work = tmp_path / "sweep"
  spec = f"{DEMO_CONFIG}:smoke"
  calls = []

  def interrupted(cfg, workdir):
    """Trials 1 and 2 run; trial 3 stops at step 6 of 12 with a checkpoint there, as a preemption would."""
    calls.append(pathlib.Path(workdir).name)
    if len(calls) < 3:
      return train_and_evaluate(cfg, workdir)
    short = cfg.copy_and_resolve_references()
    short.steps = 6
    return dataclasses.replace(train_and_evaluate(short, workdir), preempted=True)

  status = sweep.run_sweep(base, trials, work, config=spec, train_fn=interrupted)
  names = [t.name for t in trials]
  assert calls == names
  assert status == {names[0]: "done", names[1]: "done", names[2]: "partial"}
  assert [r["status"] for r in _csv(work)] == ["done", "done", "partial"]

  calls.clear()

  def recording(cfg, workdir):
    calls.append(pathlib.Path(workdir).name)
    return train_and_evaluate(cfg, workdir)

  status = sweep.run_sweep(base, trials, work, config=spec, train_fn=recording)
  assert calls == [names[2]]  # only the rest runs
  assert set(status.values()) == {"done"}
  assert sorted(p.name for p in (work / names[2] / "checkpoints").iterdir() if p.name.isdigit()) == ["12"]
  # Resumed, not restarted: steps 1-6 were logged once (first run), 7-12 once (rerun).
  lines = [json.loads(x) for x in (work / names[2] / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == list(range(1, 13))
  for t in trials:
    assert json.loads(sweep.trial_file(work / t.name).read_text())["status"] == "done"
    assert [r["step"] for r in read_curve(work / t.name / "metrics.jsonl")] == list(range(1, 13))

  rows = _csv(work)
  assert len(rows) == 3 and [r["name"] for r in rows] == names
  assert all(r["status"] == "done" and r["step"] == "12" for r in rows)
  assert [float(r["optimizer.lr"]) for r in rows] == [t.overrides["optimizer.lr"] for t in trials]
  final = [float(r["final_loss"]) for r in rows]
  assert all(np.isfinite(final)) and final[0] < final[2]  # lr 2e-3 learns faster than 1e-4 in 12 steps
  png = work / "sweep.png"
  assert png.stat().st_size > 10_000
  img = np.asarray(Image.open(png).convert("RGB"))
  assert img.shape[0] >= 300 and img.shape[1] >= 800 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50

  # The CLI sees the finished sweep: a dry run skips every trial and writes nothing.
  before = sorted(p.name for p in work.iterdir())
  proc = _cli("--config", spec, "--workdir", str(work), f"--config.data.dir={data}", "--dry_run")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("  skip    done ") == 3, proc.stdout
  assert sorted(p.name for p in work.iterdir()) == before


def _csv(work):
  import csv

  with open(work / "sweep.csv", newline="") as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------------------ the command line
def test_cli_dry_run_and_bad_inputs(tmp_path):
  spec = f"{DEMO_CONFIG}:smoke"
  work = tmp_path / "new"
  proc = _cli("--config", spec, "--workdir", str(work), "--trials", "1-2", "--dry_run")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == f"3 trials in {work} (2 selected):"
  assert [ln.split()[:3] for ln in lines[1:]] == [["0", "skip", "not"], ["1", "run", "not"], ["2", "run", "not"]]
  assert "lr=0.0005" in lines[2] and not work.exists()

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  no_sweep = tmp_path / "plain.py"
  no_sweep.write_text("from pixart_jax.train import config_defaults as c\n"
                      "def get_config(arg=None):\n  return c.smoke(c.base_config(preset='tiny', table=None, "
                      "batch_size=8, warmup=0))\n")
  for args, message in [
      (["--config", spec, "--workdir", str(work), "--trials", "0,5"],
       "error: --trials '0,5': '5' is outside the sweep's trials 0-2"),
      (["--config", spec, "--workdir", str(foreign)],
       f"error: --workdir {foreign} already holds 1 entries sweep did not write"),
      (["--config", str(no_sweep), "--workdir", str(work)], f"error: --config {no_sweep} defines no get_sweep(arg)"),
      (["--config", spec, "--workdir", str(work), "--config.keep=0"],
       "error: trial 'lr=0.002': keep must be a positive integer"),
  ]:
    proc = _cli(*args)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1].startswith(message), (message, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
  assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]
  assert not work.exists()

  # --report_only on a sweep nothing ran in yet: the folder is claimed, 3 rows "not started", an (empty) plot.
  proc = _cli("--config", spec, "--workdir", str(work), "--report_only")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(work)) == [outputs.MARKER, "sweep.csv", "sweep.png"]
  assert [(r["name"], r["status"]) for r in _csv(work)] == [
      ("lr=0.002", "not started"), ("lr=0.0005", "not started"), ("lr=0.0001", "not started")]


def test_sweep_joins_through_the_shared_distributed_init():
  """The sweep CLI joins a multi-host run through parallel/distributed.py (one place): on a TPU VM it calls
  jax.distributed.initialize() and a single host without a cluster logs and goes on; off a TPU VM (libtpu
  installed but no TPU devices, as here) nothing is called. Run in a child: the CLI defines absl flags."""
  code = """if True:
    import logging
    import jax
    from pixart_jax import sweep
    from pixart_jax.parallel import distributed
    calls = []
    def init(**kw):
      calls.append(kw)
      raise RuntimeError("no cluster here")
    jax.distributed.initialize = init
    shared = distributed.initialize
    used = []
    distributed.initialize = lambda *a, **k: (used.append(1), shared(*a, **k))[1]
    logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
    distributed.on_tpu_vm = lambda: False
    sweep._init_distributed()
    assert (calls, used) == ([], [1]), (calls, used)
    distributed.on_tpu_vm = lambda: True
    sweep._init_distributed()
    assert (calls, used) == ([{}], [1, 1]), (calls, used)
    print("OK")
  """
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
  assert "jax.distributed.initialize() not used: no cluster here" in res.stderr


def test_required_join_raises_anywhere(monkeypatch):
  """`prepare --distributed` (required=True) runs JAX's cluster detection even off a TPU VM and a failure is
  raised, not logged away."""
  import jax

  from pixart_jax.parallel import distributed

  calls = []

  def init(**kw):
    calls.append(kw)
    raise RuntimeError("no cluster here")

  monkeypatch.setattr(jax.distributed, "initialize", init)
  monkeypatch.setattr(distributed, "on_tpu_vm", lambda: False)
  distributed.initialize()
  assert calls == []
  with pytest.raises(RuntimeError, match="no cluster here"):
    distributed.initialize(required=True)
  assert calls == [{}]
