"""train.batch_schedule: the global batch grows with the tokens consumed, as Megatron's
token-threshold ramp, MaxText's enable_rampup_batch_size and Levanter's batch schedule do.

((0, 64), (50_000_000, 128), (200_000_000, 256)) trains on 64 rows of data.seq_len per update
until 50M tokens are consumed, then 128, then 256. The microbatch stays
(train.global_batch_size / train.grad_accum_steps rows, so nothing recompiles): a stage of
batch B accumulates B / microbatch of them, every batch a multiple of the first. With a
schedule the run's length is train.total_tokens, and the learning rate's warmup and cosine
decay run in tokens (train.warmup_tokens), its peak scaled with the batch as
train.batch_lr_scaling says ("sqrt": lr * sqrt(B / B_first), "linear": lr * B / B_first).

The stages are fixed by the config alone, in updates: a stage starts at the first update
after its threshold is reached. The data iterator hands out microbatches in order whatever
the stage, so no token is skipped or repeated at a boundary, and a resumed run, which
recomputes the same stages, sees exactly the batches of an unbroken one.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import ml_collections

from jaxlm import config_checks

LR_SCALINGS = ("none", "sqrt", "linear")
ADAPTIVE = ("adaptive",)  # train.batch_schedule of the adaptive ramp (jaxlm.adaptive_batch)


def is_adaptive(t: ml_collections.ConfigDict) -> bool:
    return tuple(t.batch_schedule) == ADAPTIVE


def pairs(t: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
    """The schedule as (tokens, batch) pairs: one stage of train.global_batch_size without one,
    and for the adaptive ramp before it decides anything (its decisions are appended to it
    as it goes, jaxlm.adaptive_batch)."""
    if not t.batch_schedule or is_adaptive(t):
        return ((0, int(t.global_batch_size)),)
    return tuple((int(a), int(b)) for a, b in t.batch_schedule)


@dataclasses.dataclass(frozen=True)
class Stage:
    first_step: int  # the first update of the stage, 1-based as the train loop counts
    batch: int  # global batch, rows of data.seq_len
    accum_steps: int  # microbatches per update
    tokens_before: int  # tokens consumed before first_step


def stages(t: ml_collections.ConfigDict, seq_len: int) -> tuple[Stage, ...]:
    """The stages of a validated config.train for rows of seq_len (data.seq_len); one stage
    of train.global_batch_size without a schedule."""
    micro = t.global_batch_size // t.grad_accum_steps
    schedule = pairs(t)
    out = [Stage(1, schedule[0][1], schedule[0][1] // micro, 0)]
    for threshold, batch in schedule[1:]:
        last = out[-1]
        per_step = last.batch * seq_len
        updates = max(0, math.ceil((threshold - last.tokens_before) / per_step))
        out.append(
            Stage(
                last.first_step + updates,
                batch,
                batch // micro,
                last.tokens_before + updates * per_step,
            )
        )
    return tuple(out)


def stage_at(all_stages: tuple[Stage, ...], step: int) -> int:
    """Index of the stage update `step` (1-based) is in."""
    return max(i for i, s in enumerate(all_stages) if s.first_step <= step)


def total_steps(t: ml_collections.ConfigDict, seq_len: int) -> int:
    """Updates until train.total_tokens are consumed (train.steps without a schedule)."""
    if not t.batch_schedule:
        return int(t.steps)
    total = int(t.total_tokens)
    last = [s for s in stages(t, seq_len) if s.tokens_before < total][-1]
    return last.first_step - 1 + math.ceil((total - last.tokens_before) / (last.batch * seq_len))


def updates_to_reach(t: ml_collections.ConfigDict, seq_len: int, tokens: int) -> int:
    """The updates after which at least `tokens` are consumed (0 for 0): where something
    set in tokens (data.seq_len_schedule's stages) starts, as a batch stage does."""
    all_stages = stages(t, seq_len)
    stage = [s for s in all_stages if s.tokens_before <= tokens][-1]
    per_update = stage.batch * seq_len
    return stage.first_step - 1 + math.ceil((tokens - stage.tokens_before) / per_update)


def with_total_steps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with train.steps set to the updates train.total_tokens takes (a copy;
    unchanged without a schedule)."""
    if not config.train.batch_schedule:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.steps = total_steps(config.train, config.data.seq_len)
    return config


def _tables(t, seq_len):
    all_stages = stages(t, seq_len)
    starts = jnp.asarray([s.first_step - 1 for s in all_stages], jnp.int32)  # updates done
    return all_stages, starts


def accum_schedule(t, seq_len: int):
    """MultiSteps' every_k_schedule: microbatches of the update after `count` updates."""
    all_stages, starts = _tables(t, seq_len)
    ks = jnp.asarray([s.accum_steps for s in all_stages], jnp.int32)
    return lambda count: ks[jnp.searchsorted(starts, count, side="right") - 1]


def lr_schedule(t, seq_len: int):
    """The learning rate after `count` updates: linear warmup over train.warmup_tokens, then
    cosine to lr * min_lr_ratio at train.total_tokens, times the stage's batch scaling."""
    all_stages, starts = _tables(t, seq_len)
    first = all_stages[0].batch
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[t.batch_lr_scaling]
    scales = jnp.asarray([(s.batch / first) ** power for s in all_stages], jnp.float32)
    tokens_before = jnp.asarray([s.tokens_before for s in all_stages], jnp.float32)
    per_step = jnp.asarray([s.batch * float(seq_len) for s in all_stages], jnp.float32)
    warmup, total = float(t.warmup_tokens), float(t.total_tokens)

    def schedule(count):
        i = jnp.searchsorted(starts, count, side="right") - 1
        tokens = tokens_before[i] + (count - starts[i]) * per_step[i]
        rising = tokens / max(warmup, 1.0)
        progress = jnp.clip((tokens - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
        cosine = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return t.lr * scales[i] * jnp.where(tokens < warmup, rising, cosine)

    return schedule


def check(t: ml_collections.ConfigDict) -> None:
    """The schedule's shape, and the fields of config.train that go with it."""
    config_checks.require(
        t.batch_lr_scaling in LR_SCALINGS,
        "train.batch_lr_scaling",
        t.batch_lr_scaling,
        f"one of {LR_SCALINGS}",
    )
    schedule = t.batch_schedule
    config_checks.require(
        not t.max_global_batch_size or is_adaptive(t),
        "train.max_global_batch_size",
        t.max_global_batch_size,
        "0 unless train.batch_schedule is ('adaptive',) (its ceiling)",
    )
    if not schedule:
        for field in ("total_tokens", "warmup_tokens"):
            config_checks.require(
                not t[field],
                f"train.{field}",
                t[field],
                "0 without train.batch_schedule (the run's length is train.steps)",
            )
        return
    if is_adaptive(t):
        _check_length(t)
        _check_adaptive(t)
        return

    def require(ok, valid):
        config_checks.require(ok, "train.batch_schedule", schedule, valid)

    micro = t.global_batch_size // max(t.grad_accum_steps, 1)
    require(
        isinstance(schedule, (tuple, list))
        and all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, int) for x in p)
            for p in schedule
        ),
        "a tuple of (tokens, global_batch_size) integer pairs, e.g. "
        f"((0, {t.global_batch_size}), (50_000_000, {2 * t.global_batch_size})), or "
        "('adaptive',)",
    )
    thresholds, batches = [p[0] for p in schedule], [p[1] for p in schedule]
    require(
        thresholds[0] == 0 and batches[0] == t.global_batch_size,
        f"the first stage must be (0, train.global_batch_size={t.global_batch_size})",
    )
    require(
        all(a < b for a, b in zip(thresholds, thresholds[1:])),
        "token thresholds must strictly increase",
    )
    require(
        all(b % batches[0] == 0 and b >= batches[0] for b in batches),
        f"every batch must be a multiple of the first, {batches[0]} (the microbatch of "
        f"{micro} rows stays; a stage accumulates more of them)",
    )
    _check_length(t)


def _check_length(t: ml_collections.ConfigDict) -> None:
    config_checks.require(
        t.total_tokens > 0,
        "train.total_tokens",
        t.total_tokens,
        "the run's length in tokens, needed with train.batch_schedule",
    )
    config_checks.require(
        0 <= t.warmup_tokens < t.total_tokens,
        "train.warmup_tokens",
        t.warmup_tokens,
        f"from 0 to below train.total_tokens={t.total_tokens}",
    )


def _check_adaptive(t: ml_collections.ConfigDict) -> None:
    first, ceiling = t.global_batch_size, t.max_global_batch_size
    doublings = ceiling // first if ceiling and ceiling % first == 0 else 0
    config_checks.require(
        doublings >= 2 and doublings & (doublings - 1) == 0,
        "train.max_global_batch_size",
        ceiling,
        f"train.global_batch_size={first} times a power of two (the adaptive ramp doubles "
        f"the batch), e.g. {8 * first}",
    )
    config_checks.require(
        t.grad_accum_steps >= 2 or t.noise_scale_halves,
        "train.grad_accum_steps",
        t.grad_accum_steps,
        "at least 2 with the adaptive ramp, or train.noise_scale_halves=True: the gradient "
        "noise scale that drives it compares smaller batches' gradients with the update's",
    )
    config_checks.require(
        t.adaptive_batch_interval >= 1,
        "train.adaptive_batch_interval",
        t.adaptive_batch_interval,
        "at least 1 (updates between two decisions of the adaptive ramp)",
    )
    config_checks.require(
        t.adaptive_batch_ratio > 0,
        "train.adaptive_batch_ratio",
        t.adaptive_batch_ratio,
        "above 0 (the batch doubles once the noise scale passes this times the batch)",
    )


def accum_at(config: ml_collections.ConfigDict, step: int) -> int:
    """Microbatches of update `step` (1-based)."""
    all_stages = stages(config.train, config.data.seq_len)
    return all_stages[stage_at(all_stages, step)].accum_steps


class Progress:
    """The train loop's view: the stage of each update, announced on the console where a run
    starts or resumes in one, and as a metrics row {"global_batch_size", "batch_stage"} at
    the update where a stage starts."""

    def __init__(self, config: ml_collections.ConfigDict, print_line, writer):
        self.config, self.print_line, self.writer = config, print_line, writer
        self.index = None

    @property
    def stages(self) -> tuple[Stage, ...]:  # read each time: the adaptive ramp adds stages
        return stages(self.config.train, self.config.data.seq_len)

    def enter(self, step: int) -> int:
        """Move to update `step`'s stage; its microbatches per update."""
        i = stage_at(self.stages, step)
        if i != self.index and len(self.stages) > 1:
            stage, begins = self.stages[i], step == self.stages[i].first_step
            self.print_line(
                f"step {step}/{self.config.train.steps} | batch stage {i + 1}/{len(self.stages)} "
                f"{'starts' if begins else 'continues'}: {stage.batch} rows of "
                f"{self.config.data.seq_len} tokens per update ({stage.accum_steps} "
                f"microbatches) from {stage.tokens_before:,} tokens"
            )
            if begins:
                self.writer.write(step, {"global_batch_size": stage.batch, "batch_stage": i + 1})
        self.index = i
        return self.stages[i].accum_steps
