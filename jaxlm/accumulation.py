"""One optimizer update over an accumulation window, normalised by the window's count of
real targets over every host.

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


def update(train_step, state, batches, seq_len, batch_sharding, accum, window, nonfinite, step):
    """One optimizer update of the train loop: `accum` finite microbatches of rows of
    `seq_len`, weighted by the window's target count. A non-finite one changes nothing; with
    train.nonfinite="skip" another microbatch replaces it, weighted by the count of the window
    as first drawn. Each finite microbatch goes into the log `window` and the window's
    gradients into its noise scale. (state, train_step calls, the update's gradient norm)."""
    applied = calls = 0
    targets, micro_sq, micro_tokens = None, [], []
    while applied < accum:
        drawn = [pipeline.cut_rows(next(batches), seq_len) for _ in range(accum - applied)]
        if targets is None:
            targets = window_targets(drawn)
        results = []
        for rows in drawn:
            batch = sharding_lib.global_batch(rows, batch_sharding)
            state, metrics = train_step(state, batch, targets, accum)
            calls += 1
            results.append(metrics)
        for result in jax.device_get(results):
            window.add(result["loss_sum"], result["target_tokens"])
            if nonfinite.applied(result, step):
                applied, grad_norm = applied + 1, float(result["grad_norm"])
                micro_sq.append(result["micro_grad_sq"])
                micro_tokens.append(result["target_tokens"])
    window.noise_scale.add_window(micro_sq, micro_tokens, grad_norm**2, targets)
    return state, calls, grad_norm
