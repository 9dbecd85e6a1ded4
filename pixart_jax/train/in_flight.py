"""`StepsInFlight`: a bound on how many dispatched train steps may still be running.

JAX dispatches a jitted step and returns at once; a loop that looks at no result until its next log line lets the
host run up to `log_every` steps ahead of the device (the XLA:CPU client's own cap, ~32 programs per device, is
then what blocks the dispatching thread). On the XLA:CPU runtime with several (fake) devices each queued step is
one program per device whose collectives (the gradient all-reduce) meet in an in-process rendezvous that aborts
the process when a participant is 40 s late. Measured on 2 shared cores, 8 fake devices, the demo's model and
dataset, log_every 250 (100 in the soak test): the unfinished steps grew to 31 within ~100 steps, then the process aborted ("Expected 8
threads to join the rendezvous, but only 5 (6) of them arrived on time", exit 134) after 60-150 steps in each of
5 runs. At the abort the main thread was the only one inside JAX (dispatching the next step; no checkpoint save,
sample hook or metrics fetch in flight; the other Python threads were idle Grain / tqdm / TensorBoard workers).
With at most 4 steps in flight the demo ran its 1,500 steps (16: 400 steps, no abort). A deep queue is necessary,
not sufficient: synthetic data of the same shapes also reached 31 unfinished steps without an abort, and we did
not isolate which runtime interaction starves the missing participants. On accelerators a few steps of look-ahead
are all async dispatch needs to keep the device fed (the host only waits when it is that far ahead).

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
