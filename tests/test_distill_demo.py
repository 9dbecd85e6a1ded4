"""Consistency distillation of the embedded demo's trained model (`pixart_jax.demo_lcm`): with 4 LCM steps and no
guidance at sampling, the student follows the prompt (the demo's SVM) >= 90 % of the time; the undistilled teacher
sampled the same way does not; the distillation stays within 5 minutes of CPU."""
from __future__ import annotations

import pytest

from pixart_jax import demo_lcm


@pytest.mark.slow
def test_demo_lcm_student_adheres_in_4_steps(trained_demo, tmp_path):
  student = demo_lcm.distill(trained_demo, tmp_path / "lcm")
  assert student.seconds < 300, f"distillation took {student.seconds:.0f} s"
  rows, _ = demo_lcm.adherence_table(trained_demo, student, per_digit=10, lcm_steps=(2, 4))
  got = {(r["model"], r["steps"]): r["adherence"] for r in rows}
  print(rows)
  assert got[("LCM student", 4)] >= 0.9
  # Control: the teacher itself, sampled by the LCM sampler without guidance, is far from it (the student learnt the
  # consistency map with the guidance baked in).
  teacher = demo_lcm.Distilled(student.graphdef, demo_lcm.teacher_params(trained_demo), 0.0, float("nan"))
  control, _ = demo_lcm.adherence_table(trained_demo, teacher, per_digit=10, lcm_steps=(4,))
  assert control[-1]["adherence"] <= got[("LCM student", 4)] - 0.15, control
