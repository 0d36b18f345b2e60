"""SIGTERM and Ctrl-C as a request to stop: save at the next step boundary, then exit.

TPU VMs and SLURM send SIGTERM before preemption; a user presses Ctrl-C. Both set one flag
that every process agrees on at step boundaries, so the run saves where it stands instead of
dying mid-step. A second Ctrl-C stops at once (Python's own SIGINT handling is back).
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

_CTRL_C_NOTICE = (
    b"Ctrl-C: saving a checkpoint at the next step boundary, then stopping "
    b"(Ctrl-C again stops at once, without saving)\n"
)


class StopRequest:
    """Set by SIGTERM or a first SIGINT, from construction until `restore()`."""

    def __init__(self):
        self.local = False
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, frame):
        self.local = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            os.write(2, _CTRL_C_NOTICE)  # safe in a handler, unlike print

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.local
        return bool(np.any(multihost_utils.process_allgather(np.array(self.local))))

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
