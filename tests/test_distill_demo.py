"""Consistency distillation of the embedded demo's trained model (`pixart_jax.demo_lcm`): with 4 LCM steps and no
guidance at sampling, the student follows the prompt (the demo's SVM) >= 90 % of the time; the distillation lowers the
consistency loss on held-out real digits well below the teacher's own; it stays within 5 minutes of CPU.

(The demo's digits are easy: the undistilled teacher, sampled by the LCM sampler in 4 steps, also adheres at ~98 %,
so the held-out consistency loss is the check that the student learnt the distilled map.)"""
from __future__ import annotations

import pytest

from pixart_jax import demo_lcm


@pytest.mark.slow
def test_demo_lcm_student_adheres_in_4_steps(trained_demo, tmp_path):
  student = demo_lcm.distill(trained_demo, tmp_path / "lcm")
  assert student.seconds < 300, f"distillation took {student.seconds:.0f} s"
  rows, _ = demo_lcm.adherence_table(trained_demo, student, per_digit=10, lcm_steps=(2, 4))
  got = {(r["model"], r["steps"]): r["adherence"] for r in rows}
  assert got[("LCM student", 4)] >= 0.9, rows
  teacher = demo_lcm.teacher_params(trained_demo)
  before = demo_lcm.held_out_consistency(trained_demo, teacher, teacher)
  after = demo_lcm.held_out_consistency(trained_demo, student.params, student.params)
  assert after <= 0.85 * before, (before, after)
