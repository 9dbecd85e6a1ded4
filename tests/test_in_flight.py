"""`train.in_flight.StepsInFlight`: never holds more than N dispatched steps; beyond N it waits for the oldest."""
import jax.numpy as jnp
import pytest

from pixart_jax.train import in_flight as in_flight_lib
from pixart_jax.train.in_flight import StepsInFlight


def test_holds_at_most_n_and_blocks_on_the_oldest(monkeypatch):
  waited = []
  real = in_flight_lib.jax.block_until_ready
  monkeypatch.setattr(in_flight_lib.jax, "block_until_ready", lambda x: waited.append(x) or real(x))
  bound = StepsInFlight(3)
  handles = [jnp.full((), i, jnp.float32) for i in range(10)]
  for i, h in enumerate(handles):
    bound.add(h)
    assert len(bound) == min(i + 1, 3)
    # Waited exactly for the steps older than the last 3, oldest first, each once.
    assert waited == handles[:max(0, i + 1 - 3)]
  bound.drain()
  assert len(bound) == 0 and waited == handles


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None, "4"])
def test_rejects_a_bad_bound(bad):
  with pytest.raises(ValueError, match=r"max_in_flight must be an integer >= 1 .*got"):
    StepsInFlight(bad)


def test_the_trainer_refuses_a_bad_config_bound_before_any_work(tmp_path):
  from pixart_jax.train.loop import train_and_evaluate
  from train_testlib import smoke_config

  with pytest.raises(ValueError, match=r"max_in_flight must be an integer >= 1 .*got 0"):
    train_and_evaluate(smoke_config(max_in_flight=0), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
