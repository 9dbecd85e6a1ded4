"""Soak: 1,000 train steps of a tiny model on 8 fake CPU devices through the real Grain pipeline, with log and
checkpoint cadence on. Few-step tests never queue enough steps to meet the failure this guards against: with
unbounded async dispatch the XLA:CPU runtime's collectives abort the process after ~60-140 steps ("Expected 8
threads to join the rendezvous", exit 134); `train.in_flight` bounds the steps in flight."""
import pathlib

import jax
import numpy as np
import pytest

from pixart_jax.train.loop import train_and_evaluate
from pixart_jax.train.metrics import read_jsonl

from train_testlib import fast_compiles, smoke_config

STEPS, LOG_EVERY, CKPT_EVERY = 1000, 10, 250


def soak_config(**overrides):
  """The smoke recipe shrunk further (1 block of width 32, 4x4 latents) so 1,000 steps take about a minute."""
  c = smoke_config(**overrides)
  o = c.model.overrides
  o.depth, o.hidden_size, o.num_heads, o.sample_size, o.image_size = 1, 32, 2, 4, 32
  c.data.synthetic_examples = 32
  c.steps, c.log_every, c.ckpt_every, c.keep = STEPS, LOG_EVERY, CKPT_EVERY, 2
  return c


@pytest.mark.slow
def test_thousand_steps_on_eight_devices(tmp_path):
  assert jax.device_count() == 8
  work = tmp_path / "soak"
  with fast_compiles(tmp_path / "xla_cache"):
    result = train_and_evaluate(soak_config(), str(work))
    assert result.step == STEPS and not result.preempted

    rows = read_jsonl(pathlib.Path(work) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step logged, in order
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert np.isfinite(result.last_metrics["loss"])

    ckpts = work / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [STEPS - CKPT_EVERY, STEPS]

    # The last checkpoint restores (the real resume path), bitwise equal to the state the run ended with.
    resumed = train_and_evaluate(soak_config(), str(work))
    assert resumed.step == STEPS
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(resumed.state.params), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
