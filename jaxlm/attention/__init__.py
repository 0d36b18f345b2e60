"""Causal grouped-query attention behind one function, `attend`, with segment masking for
packed rows; and `cached_attention`, the decode path's attention over a KV cache.

Shapes: q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim];
segment_ids [batch, length] (0 = padding) or None for one document per row. A query
attends to keys at or before its position inside the same segment.

Kernels (`Settings.impl`): `xla` (plain ops, any platform), `cudnn` (GPU), `splash` (the
Pallas TPU kernel; elsewhere in Pallas' interpreter, slowly but exactly), `auto` (see
`resolve`). Traced under a mesh whose "length" axis is split, attention runs context
parallel over rows in the balanced order (`balance`, `restore`, `sequence_shards`).
The remat policies that know these kernels are `REMAT_POLICIES`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.attention import context_parallel
from jaxlm.attention.balanced_order import balance, original_index, restore, sequence_shards
from jaxlm.attention.context_parallel import STRATEGIES
from jaxlm.attention.cudnn import cudnn_attention
from jaxlm.attention.remat import REMAT_POLICIES
from jaxlm.attention.splash import splash_attention, splash_block_sizes
from jaxlm.attention.xla import TPU_MAX_QUERY_BLOCKS, cached_attention, query_blocks, xla_attention

__all__ = [
    "IMPLEMENTATIONS",
    "REMAT_POLICIES",
    "STRATEGIES",
    "Settings",
    "attend",
    "balance",
    "cached_attention",
    "cudnn_attention",
    "original_index",
    "resolve",
    "restore",
    "sequence_shards",
    "splash_attention",
    "splash_block_sizes",
    "xla_attention",
]

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How attention is computed (never what it computes): the `model.*` attention fields,
    and the platform compiled for."""

    impl: str = "xla"  # one of IMPLEMENTATIONS
    # False: `xla` attention's scores and softmax in the compute dtype (MaxText's default)
    float32_scores: bool = True
    splash_block_q: int = 512  # splash kernel tiles (clipped to the row length)
    splash_block_kv: int = 512
    splash_interpret: bool | None = None  # None: interpret unless the default backend is TPU
    context_parallel: str = "all_gather"  # over a split sequence: one of STRATEGIES
    # The platform compiled for ("cpu", "gpu", "tpu"); None: the default backend. jaxlm.step
    # sets it from its devices, which may be a TPU slice described on a CPU host (jaxlm.aot).
    # On TPU causal `xla` attention runs in TPU_MAX_QUERY_BLOCKS query blocks.
    platform: str | None = None


def platform(settings: Settings) -> str:
    """The platform `settings` compile for."""
    return settings.platform or jax.default_backend()


def resolve(impl: str, platform: str, dtype) -> str:
    """`auto` made concrete for a platform: splash on TPU, cuDNN on GPU in 16-bit, else xla."""
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attend(q, k, v, segment_ids, settings: Settings = Settings()):
    """Causal GQA attention of q over k, v in the kernel `settings` pick; context parallel
    when the traced mesh splits the logical axis "length" (rows in the balanced order)."""
    s, on = settings, platform(settings)
    impl = resolve(s.impl, on, q.dtype)
    shards = sequence_shards()
    if shards > 1:
        splash = impl == "splash"
        return context_parallel.attention(
            q,
            k,
            v,
            segment_ids,
            s.context_parallel,
            block_impl="splash" if splash else "xla",
            splash_blocks=splash_block_sizes(
                q.shape[1] // shards, s.splash_block_q, s.splash_block_kv
            )
            if splash
            else None,
            splash_interpret=(
                s.splash_interpret if s.splash_interpret is not None else on != "tpu"
            ),
        )
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "xla":
        blocks = query_blocks(q.shape[1], max_blocks=TPU_MAX_QUERY_BLOCKS) if on == "tpu" else None
        return xla_attention(q, k, v, segment_ids, blocks, s.float32_scores)
    if impl == "splash":
        return splash_attention(
            q, k, v, segment_ids, s.splash_block_q, s.splash_block_kv, s.splash_interpret
        )
    raise ValueError(f"unknown attention implementation {impl!r}; use one of {IMPLEMENTATIONS}")
