"""train.batch_schedule = ("adaptive",): the batch doubles when the gradient noise scale says
a larger one is useful (McCandlish et al. 2018; Merrill et al. 2025 find the critical batch
starts near zero and grows as training goes).

The run starts at train.global_batch_size. At each logged step (train.log_every; the loop
keeps nothing in flight past one) at least train.adaptive_batch_interval updates after the
start or the last doubling (so the average reflects the current batch), the smoothed noise
scale B_simple (jaxlm.noise_scale, in tokens) is compared with the batch in tokens; once it
exceeds train.adaptive_batch_ratio times it, and doubling stays within
train.max_global_batch_size, the next update takes twice the rows. A decision is a stage of
an ordinary batch schedule (jaxlm.batch_schedule): the tokens consumed so far and the new
batch, so the microbatch stays, the learning rate keeps running in tokens (scaled as
train.batch_lr_scaling says), and train.steps becomes the updates that reach
train.total_tokens at the new batch.

The decisions go into every checkpoint's record ("batch_decisions"); a resumed run rebuilds
the same schedule, and with the noise scale's averages restored (the log window) it makes the
same decisions later. Each decision rebuilds the optimizer, whose stage table is a constant
of the compiled step: the step compiles once more per doubling (log2 of max / first times
in a run).
"""

from __future__ import annotations

from jaxlm import batch_schedule


class Ramp:
    """The decisions of one run, applied to its config (a private copy, changed in place: the
    loop's readers of train.batch_schedule and train.steps see each decision)."""

    def __init__(self, config, decisions=()):
        self.config = config
        self.enabled = batch_schedule.is_adaptive(config.train)
        self.decisions = [tuple(int(x) for x in d) for d in decisions]
        if self.enabled:
            self._apply()

    def _apply(self) -> None:
        t = self.config.train
        t.batch_schedule = ((0, int(t.global_batch_size)), *self.decisions)
        t.steps = batch_schedule.total_steps(t, self.config.data.seq_len)

    def decide(self, step: int, noise_scale: float | None) -> str:
        """After logged update `step`: double the batch from the next update if the noise scale
        says so. Returns the console line of a decision, or "" (none)."""
        t, seq_len = self.config.train, self.config.data.seq_len
        if not self.enabled or noise_scale is None or step >= t.steps:
            return ""
        stages = batch_schedule.stages(t, seq_len)
        stage = stages[batch_schedule.stage_at(stages, step)]
        batch = stage.batch
        threshold = t.adaptive_batch_ratio * batch * seq_len
        settled = step - (stage.first_step - 1) >= t.adaptive_batch_interval
        if not settled or noise_scale <= threshold or 2 * batch > t.max_global_batch_size:
            return ""
        consumed = stage.tokens_before + (step - stage.first_step + 1) * batch * seq_len
        self.decisions.append((consumed, 2 * batch))
        self._apply()
        return (
            f"step {step}/{t.steps} | adaptive batch: noise scale {noise_scale:,.0f} tokens > "
            f"{t.adaptive_batch_ratio:g} x {batch * seq_len:,} tokens per update; {2 * batch} "
            f"rows per update from step {step + 1} ({consumed:,} tokens consumed)"
        )

    def state(self) -> list:
        """For the checkpoint's record."""
        return [list(d) for d in self.decisions]
