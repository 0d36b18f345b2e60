"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training"), in tokens, from what accumulation already computes.

Each accumulation window gives two gradient estimates of different batch sizes for free: each
microbatch's own mean gradient (B_small = its target tokens) and the window's mean gradient
(B_big = the window's tokens). Since E|G_B|^2 = |G|^2 + tr(Sigma) / B, their appendix A's
unbiased estimators are

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

both noisy, so each is smoothed with an exponential moving average and B_simple is the
ratio of the averages, as the paper does. One
microbatch per update gives no second batch size: no estimate (train.grad_accum_steps >= 2).
"""

from __future__ import annotations

import numpy as np

EMA_DECAY = 0.95  # about the last 20 updates


def window_estimates(
    small_sq: float, small_tokens: float, big_sq: float, big_tokens: float
) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) unbiased from a window: the mean squared norm of its microbatches'
    gradients (of `small_tokens` tokens each) and the squared norm of their mean."""
    g_sq = (big_tokens * big_sq - small_tokens * small_sq) / (big_tokens - small_tokens)
    trace = (small_sq - big_sq) / (1.0 / small_tokens - 1.0 / big_tokens)
    return float(g_sq), float(trace)


class NoiseScale:
    """The smoothed estimate; its state is a small dict, checkpointed with the log window so
    a resumed run continues the same averages."""

    def __init__(self, state: dict | None = None, decay: float = EMA_DECAY):
        state = state or {}
        self.decay = decay
        self.g_sq = float(state.get("g_sq", 0.0))
        self.trace = float(state.get("trace", 0.0))
        self.updates = int(state.get("updates", 0))

    def add_window(self, micro_sq, micro_tokens, big_sq: float, big_tokens: float) -> None:
        """One update's microbatch squared gradient norms and token counts, and the window's
        squared gradient norm and token count. Skipped if non-finite or a single microbatch."""
        micro_sq = np.asarray(micro_sq, np.float64)
        micro_tokens = np.asarray(micro_tokens, np.float64)
        if len(micro_sq) < 2 or not np.all(np.isfinite(micro_sq)) or not np.isfinite(big_sq):
            return
        small_tokens = float(np.mean(micro_tokens))
        if not 0 < small_tokens < big_tokens:
            return
        g_sq, trace = window_estimates(float(np.mean(micro_sq)), small_tokens, big_sq, big_tokens)
        self.g_sq = self.decay * self.g_sq + (1 - self.decay) * g_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.updates += 1

    def value(self) -> float | None:
        """B_simple in tokens, or None before the first window (or while |G|^2 is not yet
        estimated positive)."""
        # Both averages start at zero and share their bias-correction factor: it cancels.
        if not self.updates or self.g_sq <= 0:
            return None
        return self.trace / self.g_sq

    def state(self) -> dict:
        return {"g_sq": self.g_sq, "trace": self.trace, "updates": self.updates}
