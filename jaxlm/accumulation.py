"""What one accumulation window normalises by: its count of real targets over every host.

The train step feeds optax.MultiSteps each microbatch's summed per-token gradient scaled by
grad_accum_steps / this count (jaxlm.step.TrainStep), so the update is the mean over the
window's tokens whatever the microbatches' masks: accumulation equals the one big batch.
The host draws a window's microbatches before dispatching the first, so it knows the count
without waiting on the device; across hosts it is one all-gathered scalar per update.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def local_targets(microbatches) -> int:
    """Real targets in this host's rows of `microbatches` (dicts with a "loss_mask")."""
    return int(sum(np.count_nonzero(rows["loss_mask"]) for rows in microbatches))


def window_targets(microbatches) -> float:
    """Real targets in the window `microbatches` are this host's share of, on all hosts."""
    count = local_targets(microbatches)
    if jax.process_count() > 1:
        count = int(np.sum(multihost_utils.process_allgather(np.int64(count))))
    return float(count)
