"""Soak: 1,000 train steps on 8 fake CPU devices through the real Grain pipeline over a real prepared dataset
(the demo's digits, `demo.prepare_dataset`, 5 s) with the demo's tiny model, log and checkpoint cadence on.

Few-step tests never queue enough steps to meet the failure this guards against: with unbounded async dispatch
(the loop blocking only at log time) this exact test aborted within its first 1,000 steps (the one run tried) ("Expected 8 threads to join
the rendezvous", XLA:CPU, exit 134); `train.in_flight` bounds the steps in flight (`config.max_in_flight`; the
measurements are in its docstring). The log interval is longer than the runtime's own queue (~32 steps), as in the
demo, so the bound is what keeps the queue short. A smaller model (depth 2, batch 32) did not abort without the
bound, so this one keeps the demo's size.
"""
import jax
import numpy as np
import pytest

from pixart_jax import demo
from pixart_jax.train.loop import train_and_evaluate
from pixart_jax.train.metrics import read_jsonl

STEPS, LOG_EVERY, CKPT_EVERY = 1000, 100, 250


def soak_config(data_dir: str):
  c = demo.train_config(data_dir, steps=STEPS, batch=64, seed=0)
  c.log_every, c.ckpt_every, c.keep = LOG_EVERY, CKPT_EVERY, 2
  return c


@pytest.mark.slow
def test_thousand_steps_on_eight_devices(tmp_path):
  assert jax.device_count() == 8
  demo.prepare_dataset(tmp_path, seed=0, progress=False)
  work = tmp_path / "train"
  result = train_and_evaluate(soak_config(str(tmp_path / "data")), str(work))
  assert result.step == STEPS and not result.preempted

  rows = read_jsonl(work / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step logged, in order
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert np.isfinite(result.last_metrics["loss"])

  ckpts = work / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [STEPS - CKPT_EVERY, STEPS]

  # The last checkpoint restores (the real resume path), bitwise equal to the state the run ended with.
  resumed = train_and_evaluate(soak_config(str(tmp_path / "data")), str(work))
  assert resumed.step == STEPS
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(resumed.state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
