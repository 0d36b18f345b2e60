"""data.seq_len_schedule: short rows first, then longer, at constant tokens per step.

A stage starts after a number of updates, or, with train.batch_schedule (whose run is measured
in tokens), once a number of tokens is consumed: the first update after it, as a batch stage.

The stages a run goes through and which one a step is in (for the train loop and the
attention checks), and what a schedule needs of the rest of the config.
"""

from __future__ import annotations

import ml_collections

from jaxlm import batch_schedule, config_checks


def seq_len_stages(config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
    """((start_step, seq_len), ...) of a validated config, start_step the updates done before
    the stage; one stage without a schedule. With a batch schedule the config gives tokens,
    turned into updates here (the adaptive ramp's decisions move them: read it each time)."""
    schedule = config.data.seq_len_schedule
    stages = tuple((int(a), int(b)) for a, b in schedule) or ((0, int(config.data.seq_len)),)
    if not config.train.batch_schedule:
        return stages
    t, seq_len = config.train, config.data.seq_len
    return tuple((batch_schedule.updates_to_reach(t, seq_len, a), b) for a, b in stages)


def stage_at(stages: tuple[tuple[int, int], ...], step: int) -> int:
    """Index of the stage that the update numbered `step` (1-based, as the loop counts) is in:
    the last one whose start_step updates are done before it."""
    return max(k for k, (start, _) in enumerate(stages) if start <= step - 1)


def check(config: ml_collections.ConfigDict, mesh_shape: dict) -> None:
    """Every length of the schedule cuts data.seq_len rows evenly and splits as data.seq_len
    does over mesh.sequence and into train.loss_chunks slices."""
    schedule, seq_len = config.data.seq_len_schedule, config.data.seq_len
    chunks = config.train.loss_chunks
    if not schedule:
        return

    def require(ok, valid):
        config_checks.require(ok, "data.seq_len_schedule", schedule, valid)

    start = "start_tokens" if config.train.batch_schedule else "start_step"
    require(
        all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, int) for x in p)
            for p in schedule
        ),
        f"a tuple of ({start}, seq_len) integer pairs (tokens with train.batch_schedule), "
        f"e.g. ((0, {max(2, seq_len // 4)}), (1000, {seq_len}))",
    )
    starts, lengths = [p[0] for p in schedule], [p[1] for p in schedule]
    require(starts[0] == 0, "the first stage must start at 0")
    require(all(a < b for a, b in zip(starts, starts[1:])), f"{start}s must strictly increase")
    require(all(a < b for a, b in zip(lengths, lengths[1:])), "lengths must strictly increase")
    require(
        lengths[-1] == seq_len,
        f"the last length must be data.seq_len={seq_len} (the length "
        "train.global_batch_size counts rows of)",
    )
    sequence = mesh_shape["sequence"]
    for length in lengths:
        require(
            length >= 2 and seq_len % length == 0,
            f"length {length} must be at least 2 "
            f"and divide data.seq_len={seq_len} (each row of data.seq_len is cut into "
            "equal rows)",
        )
        split = 2 * sequence if sequence > 1 else 1  # two chunks per shard (context_parallel)
        require(
            length % split == 0,
            f"length {length} must be divisible by {split} (2 * mesh.sequence={sequence})",
        )
        require(
            length % chunks == 0 and (length // chunks) % sequence == 0,
            f"length {length} must be divisible by train.loss_chunks={chunks}, in slices "
            f"divisible by mesh.sequence={sequence}",
        )
