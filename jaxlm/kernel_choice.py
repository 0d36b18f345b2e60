"""Which attention kernel a config runs with on a platform, and what splash needs of it.

Splash's tiles must divide the rows at every length of data.seq_len_schedule; "auto" falls
back to XLA attention where they would not, an explicit "splash" is a ConfigError.
"""

from __future__ import annotations

import ml_collections

from jaxlm import attention as attention_lib
from jaxlm.config_checks import require
from jaxlm.errors import ConfigError
from jaxlm.seq_len_schedule import seq_len_stages


def check_splash(config: ml_collections.ConfigDict, mesh_shape: dict) -> None:
    """What the splash kernel needs of a config (also for "auto" once it resolves to splash),
    at every length of the schedule.

    With a split sequence the kernel runs per shard against gathered keys
    (context_parallel="all_gather"): query tiles then divide one shard's queries. The ring
    runs its blocks in jaxlm.attention.ring_kernels instead, whose key tiles need shards of whole
    128-token lanes."""
    m, final, shards = config.model, config.data.seq_len, mesh_shape["sequence"]
    if shards > 1 and m.context_parallel == "ring":
        for seq_len in sorted({length for _, length in seq_len_stages(config)}, reverse=True):
            ok = (seq_len // shards) % 128 == 0
            field, value = (
                ("data.seq_len", final)
                if seq_len == final
                else ("data.seq_len_schedule", config.data.seq_len_schedule)
            )
            require(
                ok,
                field,
                value,
                f"row lengths whose shards (length / mesh.sequence="
                f"{shards}) are multiples of 128 for the ring's Pallas blocks (length "
                f"{seq_len} is not); or use model.attention='xla'",
            )
        return
    for seq_len in sorted({length for _, length in seq_len_stages(config)}, reverse=True):
        length = seq_len // shards  # one shard's queries
        for field in ("splash_block_q", "splash_block_kv"):
            block = min(int(m[field]), length)
            multiple = 128 if field == "splash_block_kv" else 8
            ok = block >= 1 and length % block == 0 and block % multiple == 0
            if seq_len == final:
                require(
                    ok,
                    f"model.{field}",
                    m[field],
                    f"a multiple of {multiple} that divides "
                    f"{length} (data.seq_len / mesh.sequence) once clipped to it (splash "
                    "attention's tiles)",
                )
            else:
                require(
                    ok,
                    "data.seq_len_schedule",
                    config.data.seq_len_schedule,
                    f"length {seq_len} does not fit splash attention's tiles: model.{field}="
                    f"{m[field]} clipped to {length} (the length / mesh.sequence) must be a "
                    f"multiple of {multiple} that divides it; use longer lengths, or "
                    "model.attention='xla'",
                )


def attention_impl(config: ml_collections.ConfigDict, mesh_shape: dict, platform: str) -> str:
    """The attention kernel a config runs with on `platform`: "auto" is splash on TPU where
    splash applies to the config (else xla), cuDNN on GPU in 16-bit, else xla. An explicit
    "splash" that cannot work is a ConfigError naming the field."""
    impl = attention_lib.resolve(config.model.attention, platform, config.model.dtype)
    if impl != "splash":
        return impl
    try:
        check_splash(config, mesh_shape)
    except ConfigError:
        if config.model.attention != "auto":
            raise
        return "xla"
    return impl
