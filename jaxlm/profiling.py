"""`jax.profiler` traces of chosen train steps: train.profile_steps and train.profile_every.

A trace of steps first..last goes to WORKDIR/profile/<first>/ (one folder per process on a
multi-process run: process_<i>/ in it), in the layout TensorBoard's profile plugin and xprof
read (plugins/profile/<time>/<host>.xplane.pb) beside a Chrome-format <host>.trace.json.gz
that Perfetto opens. A trace starts with nothing in flight and stops once its last step is
read back, before that step's evaluation or checkpoint save; a step that compiles is left
out (the trace starts at the step after it), so the trace shows the steady state only.
"""

from __future__ import annotations

import os

import jax
from etils import epath


def trace_dir(root: epath.PathLike, first_step: int) -> str:
    """Where a trace that starts at `first_step` goes, for this process."""
    path = epath.Path(root) / str(first_step)
    if jax.process_count() > 1:
        path = path / f"process_{jax.process_index()}"
    return os.fspath(path)


class StepProfiler:
    """Starts and stops traces around the train steps of the configured windows."""

    def __init__(self, train_config, root: epath.PathLike, say=print):
        steps = tuple(train_config.profile_steps)
        self.first, self.last = steps if steps else (0, -1)
        self.every = int(train_config.profile_every)
        self.root, self.say = root, say
        self.active_from = None  # the first traced step of the trace running now

    def _window(self, step: int) -> tuple[int, int] | None:
        """The (first, last) window that holds `step`, if any."""
        if self.last < 0 or step < self.first:
            return None
        shift = (step - self.first) // self.every * self.every if self.every else 0
        first, last = self.first + shift, self.last + shift
        return (first, last) if step <= last else None

    def edge(self, step: int) -> bool:
        """Whether nothing may be dispatched past `step`: a window starts after it or ends."""
        window, following = self._window(step), self._window(step + 1)
        return bool(window and step == window[1]) or bool(following and following[0] == step + 1)

    def before_step(self, step: int, compiles: bool) -> None:
        """Start a trace if `step` is in a window and does not compile."""
        if self.active_from is None and not compiles and self._window(step):
            jax.profiler.start_trace(trace_dir(self.root, step))
            self.active_from = step

    def after_step(self, step: int, state) -> None:
        """Stop the trace once the last step of its window is done."""
        window = self._window(step)
        if self.active_from is not None and window and step == window[1]:
            jax.block_until_ready(state)
            first = self.active_from
            self.close()
            self.say(
                f"step {step} | profile of steps {first}-{step}: {trace_dir(self.root, first)}"
            )

    def close(self) -> None:
        """Stop a running trace (the run ended or failed inside a window)."""
        if self.active_from is not None:
            jax.profiler.stop_trace()
            self.active_from = None
