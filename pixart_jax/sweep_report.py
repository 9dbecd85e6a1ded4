"""The comparison of a sweep's trials: `sweep.csv` (one row per trial) and `sweep.png` (matplotlib).

Reads each trial's `metrics.jsonl` (written by `train.metrics.MetricWriter`). A resumed run appends to that file and
may log a step twice (the steps after its last checkpoint are trained again): the last record of a step wins.

CSV columns: index, name, status (done | partial | not started), step (last logged), the trial's overrides (one
column per swept key), then `final_<metric>` (the last logged value of every scalar metric: loss, lr, grad_norm,
and whatever evaluation metrics the trainer logged) and `min_loss`.

The plot: the loss curves of all trials overlaid (left; curves of 20 or more logged points are drawn as logged,
faint, under a running mean over a tenth of their points), and one horizontal bar chart per final metric (right): `loss` and, where logged, evaluation metrics
(keys that contain 'fid' or 'clip').
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Mapping, Sequence

from etils import epath

from pixart_jax.sweeps import Trial

__all__ = ["read_curve", "summarize", "write_csv", "plot"]

_SKIP = ("step", "time")
SMOOTH_DIVISOR = 10  # a curve of n logged points is drawn with a running mean over n // 10 of them (if >= 2)


def read_curve(path) -> list[dict]:
  """The records of a metrics.jsonl, one per step (the last record of a repeated step wins), by step. A torn last
  line (a run killed mid-write) is ignored."""
  path = epath.Path(path)
  if not path.exists():
    return []
  by_step: dict[int, dict] = {}
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except ValueError:
      continue
    if isinstance(rec, dict) and isinstance(rec.get("step"), int):
      by_step[rec["step"]] = rec
  return [by_step[s] for s in sorted(by_step)]


def summarize(workdir, trials: Sequence[Trial], status: Mapping[str, str]) -> list[dict]:
  """One row per trial (see the module doc); `status` maps trial names to their status."""
  rows = []
  for t in trials:
    curve = read_curve(epath.Path(workdir) / t.name / "metrics.jsonl")
    row: dict[str, Any] = {"index": t.index, "name": t.name, "status": status.get(t.name, "not started"),
                           "step": curve[-1]["step"] if curve else 0}
    row.update({k: _cell(v) for k, v in t.overrides.items()})
    finals: dict[str, float] = {}
    for rec in curve:
      for k, v in rec.items():
        if k not in _SKIP and isinstance(v, (int, float)):
          finals[k] = float(v)
    row.update({f"final_{k}": v for k, v in sorted(finals.items())})
    losses = [float(r["loss"]) for r in curve if isinstance(r.get("loss"), (int, float))]
    finite = [x for x in losses if math.isfinite(x)]
    row["min_loss"] = min(finite) if finite else None
    row["_curve"] = [(r["step"], float(r["loss"])) for r in curve if isinstance(r.get("loss"), (int, float))]
    rows.append(row)
  return rows


def _cell(v: Any) -> Any:
  return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def write_csv(rows: Sequence[Mapping], path) -> epath.Path:
  """Writes the rows (columns in first-seen order; `_`-prefixed keys left out) atomically."""
  columns: list[str] = []
  for r in rows:
    columns += [k for k in r if not k.startswith("_") and k not in columns]
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in columns})
  return _write_atomic(epath.Path(path), buf.getvalue().encode())


def _write_atomic(path: epath.Path, data: bytes) -> epath.Path:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)
  return path


def _smooth(ys: list[float], n: int) -> list[float]:
  out, acc = [], []
  for y in ys:
    acc.append(y)
    if len(acc) > n:
      acc.pop(0)
    out.append(sum(acc) / len(acc))
  return out


def plot(rows: Sequence[Mapping], path, *, title: str = "") -> epath.Path:
  """Writes the PNG described in the module doc; returns its path."""
  import matplotlib

  matplotlib.use("Agg", force=True)
  from matplotlib import pyplot as plt

  metrics = ["loss"] + sorted({k[len("final_"):] for r in rows for k in r
                               if k.startswith("final_") and ("fid" in k.lower() or "clip" in k.lower())})
  fig = plt.figure(figsize=(12, max(4.0, 2.2 * len(metrics))), dpi=100)
  grid = fig.add_gridspec(len(metrics), 2, width_ratios=(1.6, 1))
  ax = fig.add_subplot(grid[:, 0])
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  smoothed = False
  for i, r in enumerate(rows):
    curve = [(s, y) for s, y in r["_curve"] if math.isfinite(y)]
    if not curve:
      continue
    steps, ys = zip(*curve)
    c = colors[i % len(colors)]
    window = len(ys) // SMOOTH_DIVISOR
    if window > 1:
      smoothed = True
      ax.plot(steps, ys, color=c, alpha=0.25, linewidth=0.8)
      ax.plot(steps, _smooth(list(ys), window), color=c, linewidth=1.6, label=r["name"])
    else:
      ax.plot(steps, ys, color=c, linewidth=1.6, marker="o", markersize=3, label=r["name"])
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.set_title("loss curves" + (" (faint: as logged; bold: running mean)" if smoothed else ""))
  ax.grid(alpha=0.3)
  if any(r["_curve"] for r in rows):
    ax.legend(fontsize=8)
  names = [r["name"] for r in rows]
  for j, m in enumerate(metrics):
    bx = fig.add_subplot(grid[j, 1])
    vals = [r.get(f"final_{m}") for r in rows]
    ys = list(range(len(rows)))
    bx.barh(ys, [v if v is not None and math.isfinite(v) else 0.0 for v in vals],
            color=[colors[i % len(colors)] for i in ys])
    for y, v in zip(ys, vals):
      bx.text(0, y, f" {v:.4g}" if v is not None else " n/a", va="center", fontsize=8)
    bx.set_yticks(ys, names, fontsize=8)
    bx.invert_yaxis()
    bx.set_title(f"final {m}", fontsize=10)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return _write_atomic(epath.Path(path), buf.getvalue())
