"""The ring's blocks in Pallas (TPU): the kernels of jaxlm.attention.ring_kernels launched
over a block (`block_forward`, `block_backward`), and the ring's block backend that runs them
(`PallasBlocks`, beside ring_xla's `XlaBlocks`).

Tiles are the largest divisors of the lengths up to BLOCK_Q and BLOCK_K. GQA: query head h
reads key/value head h // (heads / kv_heads), never repeated in memory.

Layouts: q [b, h, t, d], k, v [b, kv, s, d]; positions int32 [t] and [s]; segment ids int32
[b, t] and [b, s]. `interpret=True` runs the kernels in Pallas' interpreter (any backend).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm.attention.ring_kernels import dkv_kernel, dq_kernel, forward_kernel

LANES, SUBLANES = 128, 8
BLOCK_Q, BLOCK_K = 512, 512  # the largest tiles used (clipped to divisors of the lengths)


def _tile(length: int, target: int, multiple: int) -> int:
    """The largest divisor of `length` up to `target`, a multiple of `multiple` where one
    is (Mosaic's tiles: 8 rows, 128 lanes), else any (the interpreter takes any)."""
    divisors = [t for t in range(1, min(length, target) + 1) if length % t == 0]
    return max([t for t in divisors if t % multiple == 0] or divisors)


def _kv_head(head, group: int):
    """The key/value head a query head reads (lax.div: jnp's // lowers a sign op that
    Mosaic cannot lower without a TPU at hand)."""
    return jax.lax.div(head, group)


def _bounds(q_pos, k_pos, block_q, block_k):
    """Scalar prefetch: each query tile's last position, each key tile's first."""
    return (
        jnp.max(q_pos.reshape(-1, block_q), axis=1),
        jnp.min(k_pos.reshape(-1, block_k), axis=1),
    )


def _vectors(q_pos, k_pos, q_seg, k_seg):
    """Positions and segment ids laid out for the kernels: query side lane-broadcast
    [.., t, 128], key side sublane-broadcast [.., 8, s]."""

    def lanes(a):
        return jnp.broadcast_to(a[..., None], (*a.shape, LANES))

    def sublanes(a):
        return jnp.broadcast_to(a[..., None, :], (*a.shape[:-1], SUBLANES, a.shape[-1]))

    return lanes(q_pos), sublanes(k_pos), lanes(q_seg), sublanes(k_seg)


def _prepare(q_pos, k_pos, q_seg, k_seg, block_q, block_k):
    """The tiles (query, key), the scalar-prefetch bounds and the laid-out vectors."""
    bq = _tile(q_pos.shape[0], block_q or BLOCK_Q, SUBLANES)
    bk = _tile(k_pos.shape[0], block_k or BLOCK_K, LANES)
    return bq, bk, _bounds(q_pos, k_pos, bq, bk), _vectors(q_pos, k_pos, q_seg, k_seg)


def _row_grid_specs(bq, bk, d, group):
    """Block specs on a (batch, query head, query tile, key tile) grid: a query-side tile, a
    key/value tile, a query-side lane-broadcast row vector, and the four mask vectors."""
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, d), lambda b, h, i, j, *_: (b, _kv_head(h, group), j, 0)
    )
    row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0))
    vector_specs = [
        pl.BlockSpec((bq, LANES), lambda b, h, i, j, *_: (i, 0)),
        pl.BlockSpec((SUBLANES, bk), lambda b, h, i, j, *_: (0, j)),
        pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, *_: (b, 0, j)),
    ]
    return q_spec, kv_spec, row_spec, vector_specs


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def block_forward(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    *,
    scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
):
    """Attention of q over the block (k, v): out float32 [b, h, t, d] (normalized over this
    block's keys; 0 where a row sees none) and its log-sum-exp float32 [b, h, t]."""
    (b, h, t, d), kv, s = q.shape, k.shape[1], k.shape[2]
    group = h // kv
    bq, bk, bounds, vectors = _prepare(q_pos, k_pos, q_seg, k_seg, block_q, block_k)
    grid = (b, h, t // bq, s // bk)
    q_spec, kv_spec, row_spec, vector_specs = _row_grid_specs(bq, bk, d, group)
    out, lse = pl.pallas_call(
        functools.partial(forward_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=[q_spec, kv_spec, kv_spec, *vector_specs],
            out_specs=[q_spec, row_spec],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, t, d), jnp.float32),
            jax.ShapeDtypeStruct((b, h, t, LANES), jnp.float32),
        ],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*bounds, q, k, v, *vectors)
    return out, lse[..., 0]


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def block_backward(
    q,
    k,
    v,
    q_pos,
    k_pos,
    q_seg,
    k_seg,
    do,
    lse,
    delta,
    *,
    scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
):
    """Gradients of the block (float32): dq [b, h, t, d], dk and dv [b, kv, s, d], given the
    rows' global log-sum-exp `lse` and D = rowsum(dO * O) `delta`, both [b, h, t], and dO."""
    (b, h, t, d), kv, s = q.shape, k.shape[1], k.shape[2]
    group = h // kv
    bq, bk, bounds, vectors = _prepare(q_pos, k_pos, q_seg, k_seg, block_q, block_k)
    lse, delta = (jnp.broadcast_to(a[..., None], (*a.shape, LANES)) for a in (lse, delta))
    args = (*bounds, q, k, v, do, lse, delta, *vectors)

    # dq: grid (b, h, query tiles, key tiles), the key tiles reduced.
    q_spec, kv_spec, row_spec, vector_specs = _row_grid_specs(bq, bk, d, group)
    dq = pl.pallas_call(
        functools.partial(dq_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, t // bq, s // bk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *vector_specs],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, h, t, d), jnp.float32),
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)

    # dk, dv: grid (b, kv heads, key tiles, heads of the group, query tiles), the last two
    # reduced.
    q_spec = pl.BlockSpec(
        (None, None, bq, d), lambda b_, k_, j, g, i, *_: (b_, k_ * group + g, i, 0)
    )
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, k_, j, g, i, *_: (b_, k_, j, 0))
    row_spec = pl.BlockSpec(
        (None, None, bq, LANES), lambda b_, k_, j, g, i, *_: (b_, k_ * group + g, i, 0)
    )
    dk, dv = pl.pallas_call(
        functools.partial(dkv_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kv, s // bk, group, t // bq),
            in_specs=[
                q_spec,
                kv_spec,
                kv_spec,
                q_spec,
                row_spec,
                row_spec,
                pl.BlockSpec((bq, LANES), lambda b_, k_, j, g, i, *_: (i, 0)),
                pl.BlockSpec((SUBLANES, bk), lambda b_, k_, j, g, i, *_: (0, j)),
                pl.BlockSpec((None, bq, LANES), lambda b_, k_, j, g, i, *_: (b_, i, 0)),
                pl.BlockSpec((None, SUBLANES, bk), lambda b_, k_, j, g, i, *_: (b_, 0, j)),
            ],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, kv, s, d), jnp.float32)] * 2,
        compiler_params=_compiler_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
    )(*args)
    return dq, dk, dv


@dataclasses.dataclass(frozen=True)
class PallasBlocks:
    """The ring's block backend in these kernels (see jaxlm.attention.ring); `interpret`
    runs them in Pallas' interpreter. Layout: q [b, h, t, d], k, v [b, kv, s, d], segment
    ids int32 [b, t] (all ones for unpacked rows)."""

    interpret: bool = False

    def enter(self, q, k, v, seg):
        if seg is None:
            seg = jnp.ones(q.shape[:2], jnp.int32)
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads first, as the kernels want
        return q, k, v, seg.astype(jnp.int32)

    def leave(self, out, shape):
        return jnp.swapaxes(out, 1, 2)

    def rows(self, q):
        return q.shape[2]

    def start(self, q):
        return None

    def forward(self, state, q, k, v, q_index, k_index, q_seg, k_seg, diagonal: bool):
        """The block's (out, lse) added to the running ones by log-sum-exp weights."""
        out_b, lse_b = block_forward(
            q,
            k,
            v,
            q_index,
            k_index,
            q_seg,
            k_seg,
            scale=q.shape[-1] ** -0.5,
            interpret=self.interpret,
        )
        if diagonal:  # the diagonal block: every row sees itself, so lse is finite after it
            return out_b, lse_b
        out, lse = state
        new = jnp.logaddexp(lse, lse_b)
        out = out * jnp.exp(lse - new)[..., None] + out_b * jnp.exp(lse_b - new)[..., None]
        return out, new

    def finish(self, state, q):
        out, lse = state
        return out.astype(q.dtype), lse

    def delta(self, do, out):
        return jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def backward(
        self, grads, q, k, v, do, delta, lse, q_index, k_index, q_seg, k_seg, diagonal: bool
    ):
        pq, pk, pv = block_backward(
            q,
            k,
            v,
            q_index,
            k_index,
            q_seg,
            k_seg,
            do,
            lse,
            delta,
            scale=q.shape[-1] ** -0.5,
            interpret=self.interpret,
        )
        dq, dk, dv = grads
        return dq + pq, dk + pk, dv + pv
