"""`StepsInFlight`: a bound on how many dispatched train steps may still be running.

JAX dispatches a jitted step and returns at once; a loop that never looks at a result until its next log line
queues up to `log_every` steps (the runtime's own cap, not ours, is what finally blocks it). On the XLA:CPU
runtime with several (fake) devices every queued step is one program per device whose collectives (the gradient
all-reduce) meet in an in-process rendezvous that aborts the process when a participant is more than 40 s late.
With dozens of steps queued, 8 devices on 2 busy cores, one device's share of a step can be starved for that long:
the demo on 8 fake devices (log_every 250) aborted after ~140 steps with "Expected 8 threads to join the
rendezvous, but only 5 of them arrived on time" (exit 134), 3 runs out of 3 under load, and completed every time
with at most 4 steps in flight. On accelerators a few steps of look-ahead are all that async dispatch needs to
keep the device fed, so the same bound costs nothing there.

The loop hands over one small output of each step (the loss) and, once more than `max_in_flight` are held, waits
for the oldest one: the host runs at most `max_in_flight` steps ahead of the device.
"""
from __future__ import annotations

import collections
from typing import Any

import jax


class StepsInFlight:
  """Holds the handles of the last `max_in_flight` dispatched steps; `add` blocks on the oldest beyond that."""

  def __init__(self, max_in_flight: int):
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
      raise ValueError(f"max_in_flight must be an integer >= 1 (steps the host may run ahead of the device), "
                       f"got {max_in_flight!r}")
    self.max_in_flight = max_in_flight
    self._queue: collections.deque = collections.deque()

  def __len__(self) -> int:
    return len(self._queue)

  def add(self, handle: Any) -> None:
    """Records a just-dispatched step's output (any pytree of jax.Arrays); waits for the oldest beyond the bound."""
    self._queue.append(handle)
    while len(self._queue) > self.max_in_flight:
      jax.block_until_ready(self._queue.popleft())

  def drain(self) -> None:
    """Waits for every held step."""
    while self._queue:
      jax.block_until_ready(self._queue.popleft())
