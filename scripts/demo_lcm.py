"""Distils the embedded demo's trained model (latent consistency distillation) and measures few-step sampling.

  python scripts/demo_lcm.py --demo workdir_demo --workdir workdir_lcm \
      [--sheet docs/lcm_demo_contact_sheet.png] [--report workdir_lcm/lcm_report.json]

`--demo` is a finished `python -m pixart_jax.demo` workdir (read only). Prints the adherence table (teacher with
20-step DPM-Solver++ and guidance, student with 1/2/4 LCM steps) as Markdown and writes the contact sheet (rows:
digits 0-9; blocks left to right: teacher, LCM 1, 2, 4 steps; 4 samples each, same initial noise) and a JSON report.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--demo", required=True, help="a finished demo workdir (python -m pixart_jax.demo)")
  p.add_argument("--workdir", required=True, help="the distillation run's workdir (resumed if it has checkpoints)")
  p.add_argument("--sheet", default="docs/lcm_demo_contact_sheet.png", help="contact sheet PNG to write")
  p.add_argument("--report", default=None, help="JSON report (default: WORKDIR/lcm_report.json)")
  p.add_argument("--steps", type=int, default=None, help="distillation steps (default: demo_lcm.STEPS)")
  p.add_argument("--per_digit", type=int, default=10, help="samples per digit for the adherence")
  args = p.parse_args(argv)

  from pixart_jax import checks, demo_lcm
  from pixart_jax.demo import load_trained

  checks.positive("--per_digit", args.per_digit)
  if args.steps is not None:
    checks.positive("--steps", args.steps)
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("pixart_jax").setLevel(logging.INFO)
  demo = load_trained(args.demo)
  kw = {} if args.steps is None else {"steps": args.steps}
  student = demo_lcm.distill(demo, args.workdir, **kw)
  rows, images = demo_lcm.adherence_table(demo, student, per_digit=args.per_digit)
  teacher = demo_lcm.teacher_params(demo)
  before = demo_lcm.held_out_consistency(demo, teacher, teacher)
  after = demo_lcm.held_out_consistency(demo, student.params, student.params)
  print(f"distillation: {student.seconds:.0f} s, final loss {student.final_loss:.4g}; held-out consistency loss "
        f"{before:.4g} (teacher) -> {after:.4g} (student)\n")
  print("| model | sampler | steps | guidance | forward passes / image | adherence |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']} | {r['forward_passes']} | "
          f"{r['adherence']:.0%} |")
  sheet = demo_lcm.contact_sheet(images, ["dpm-solver-20", "lcm-1", "lcm-2", "lcm-4"], args.per_digit)
  out = pathlib.Path(args.sheet)
  out.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(out)
  report = pathlib.Path(args.report or pathlib.Path(args.workdir) / "lcm_report.json")
  report.write_text(json.dumps({"distill_seconds": round(student.seconds, 1), "final_loss": student.final_loss,
                                "held_out_consistency": {"teacher": before, "student": after},
                                "rows": rows}, indent=2))
  print(f"\ncontact sheet: {out}; report: {report}")
  return 0


if __name__ == "__main__":
  from pixart_jax import cli_errors

  sys.exit(cli_errors.run(main))
