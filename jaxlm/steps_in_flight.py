"""Train steps dispatched ahead of their metrics, so the host never leaves the device idle.

Reading a step's metrics waits for the device; dispatching the next step first means the
device has work queued while the host reads, logs and builds the batch after that. The
device state depends only on the order of the batches: a non-finite microbatch leaves the
state as it was (`jaxlm.step`), so the next one dispatched takes its place whichever
optimizer step the host had meant it for. The host therefore counts the finite results as
they come back, in dispatch order, and an optimizer step is done at every
`grad_accum_steps`-th one. Where the state must be exactly one step's (a checkpoint, an
evaluation, a new row length) the loop dispatches nothing past it; there a non-finite
microbatch is replaced by one dispatched on the spot.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import jax


class StepsInFlight:
    """The train state and the microbatches dispatched on it whose metrics are not read yet.

    `run_call(state, missing) -> (state, metrics)` dispatches one microbatch (it takes the
    next batch; `missing` > 0: a replacement, that many microbatches still to apply). `accum`,
    the microbatches of the step being completed, may change between steps.
    """

    def __init__(self, run_call: Callable, state, grad_accum_steps: int):
        self.run_call, self.state, self.accum = run_call, state, grad_accum_steps
        self.pending = collections.deque()  # metrics of dispatched calls, oldest first
        self.applied = 0  # finite microbatches read back for the step being completed

    @property
    def in_flight(self) -> bool:
        return bool(self.pending)

    def _dispatch_one(self, missing: int | None = None) -> None:
        self.state, metrics = self.run_call(self.state, missing)
        self.pending.append(metrics)

    def dispatch(self, steps: int) -> None:
        """Dispatch microbatches until, if all are finite, `steps` optimizer steps from the
        one being completed are in flight: 1 keeps the device on this step only, 2 queues
        the next one behind it."""
        while self.applied + len(self.pending) < steps * self.accum:
            self._dispatch_one()

    def finish_step(self, applied: Callable[[dict], bool]) -> tuple[int, float]:
        """Read results until one optimizer step is complete; `applied(result)` judges each
        (False: non-finite, skipped). With nothing left in flight a replacement is dispatched.
        (microbatches read, the completed update's gradient norm)."""
        calls = 0
        while True:
            if not self.pending:
                self._dispatch_one(self.accum - self.applied)
            result = jax.device_get(self.pending.popleft())
            calls += 1
            if applied(result):
                self.applied += 1
                if self.applied == self.accum:
                    self.applied = 0
                    return calls, float(result["grad_norm"])
