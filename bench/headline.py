"""The headline CPU table in one command (`make bench`, under 10 minutes on 2 cores): XL/2 forward at 256 / 512 px,
20-step CFG sampling and the XL/2 train step, each against the PyTorch reference in the same run, fp32 and the
opt-in bf16 compute path, written to bench/results/cpu_<cpu model>.md with the machine line (CPU model, matmul
flags, load) of every script.

    python bench/headline.py                 # all of it
    python bench/headline.py --only forward  # one part: forward | sampling | train
    python bench/headline.py --out /tmp/x.md

Each part runs as its own process (each script sets its own XLA / torch threads); their markdown tables are
collected as printed. bench/RESULTS.md quotes these files; `python bench/merge_results.py` rebuilds it.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PARTS = {
    "forward": [["bench_forward.py", "--sizes", "256,512", "--dtypes", "float32,bfloat16", "--runs", "2"]],
    "sampling": [["bench_sampling.py", "--runs", "2"], ["bench_sampling.py", "--runs", "2", "--dtype", "bfloat16"]],
    "train": [["bench_train_step.py", "--rounds", "1", "--runs", "2"]],
}
_NOISE = re.compile(r"warn|Warning|deprecat|Loading|it/s\]|libtpu|TPU_|InitGoogle|E0000|=== Source|learning/|^\s*$",
                    re.IGNORECASE)


def run_part(cmd: list[str]) -> tuple[str, float]:
  """Runs one bench script; returns its output without warnings / progress bars, and the wall seconds."""
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                        cwd=HERE.parent, env={**__import__("os").environ, "PYTHONPATH": str(HERE.parent)})
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"bench/{cmd[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  lines = [ln for ln in proc.stdout.splitlines() if not _NOISE.search(ln) or ln.startswith("|")]
  return "\n".join(lines), seconds


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default=None, choices=sorted(PARTS), help="run one part")
  ap.add_argument("--out", default=None, help="markdown file (default bench/results/cpu_<cpu model>.md)")
  args = ap.parse_args()
  from common import cpu_flags, cpu_model, loadavg

  slug = re.sub(r"[^a-z0-9]+", "_", re.sub(r"\((r|tm)\)", "", cpu_model().lower())).strip("_")
  out = pathlib.Path(args.out) if args.out else HERE / "results" / f"cpu_{slug}.md"
  t_all = time.perf_counter()
  sections = [f"# CPU headline: {cpu_model()}", "",
              f"Made by `python bench/headline.py{' --only ' + args.only if args.only else ''}` "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); CPU flags: {cpu_flags()}; load at the "
              f"start: {loadavg()}. Ratios are torch time / JAX time in the same run (> 1: JAX faster).", ""]
  for name in [args.only] if args.only else PARTS:
    for cmd in PARTS[name]:
      print(f"== {name}: python bench/{' '.join(cmd)}", flush=True)
      text, seconds = run_part(cmd)
      print(text, flush=True)
      sections += [f"## {name}: `python bench/{' '.join(cmd)}` ({seconds:.0f} s)", "", text, ""]
  sections.append(f"Total {time.perf_counter() - t_all:.0f} s; load at the end: {loadavg()}.")
  out.write_text("\n".join(sections) + "\n")
  print(f"\nwrote {out} in {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
  main()
