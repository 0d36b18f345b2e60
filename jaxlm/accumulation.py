"""One optimizer update over an accumulation window, normalised by the window's count of
real targets over every host.

The train step feeds optax.MultiSteps each microbatch's summed per-token gradient scaled by
grad_accum_steps / this count (jaxlm.step.TrainStep), so the update is the mean over the
window's tokens whatever the microbatches' masks: accumulation equals the one big batch.
The host draws a window's microbatches before dispatching the first, so it knows the count
without waiting on the device; across hosts it is one all-gathered scalar per update.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import sharding as sharding_lib
from jaxlm.data import pipeline


def local_targets(microbatches) -> int:
    """Real targets in this host's rows of `microbatches` (dicts with a "loss_mask")."""
    return int(sum(np.count_nonzero(rows["loss_mask"]) for rows in microbatches))


def window_targets(microbatches) -> float:
    """Real targets in the window `microbatches` are this host's share of, on all hosts."""
    count = local_targets(microbatches)
    if jax.process_count() > 1:
        count = int(np.sum(multihost_utils.process_allgather(np.int64(count))))
    return float(count)


class WindowFeed:
    """The train loop's microbatches, drawn a whole accumulation window at a time so each
    goes out with its window's target count: (global batch, window targets, microbatches).

    `draw(missing)` with `missing` > 0 is a replacement for skipped microbatches
    (train.nonfinite="skip"): the feed draws that many more, weighted by the count of the
    window as first drawn, so the update stays a per-token mean of its window. The train
    loop keeps no step in flight when skipping, so replacements never mix windows.
    """

    def __init__(self, batches, seq_len, accum_at, batch_sharding, first_step: int):
        self.batches, self.seq_len, self.accum_at = batches, seq_len, accum_at
        self.batch_sharding, self.step = batch_sharding, first_step  # the next window's update
        self.queue, self.targets, self.accum = collections.deque(), 0.0, 1

    def draw(self, missing: int | None = None):
        if not self.queue:
            if missing:
                n = missing
            else:
                self.accum, self.step = self.accum_at(self.step), self.step + 1
                n = self.accum
            rows = [pipeline.cut_rows(next(self.batches), self.seq_len()) for _ in range(n)]
            if not missing:
                self.targets = window_targets(rows)
            self.queue.extend(rows)
        batch = sharding_lib.global_batch(self.queue.popleft(), self.batch_sharding)
        return batch, self.targets, self.accum
