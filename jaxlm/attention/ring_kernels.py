"""Flash-attention block kernels in Pallas (TPU) for the ring (jaxlm.attention.ring), and the
ring's block backend that runs them (`PallasBlocks`).

A ring step attends one shard's queries to the key/value block it holds, and the ring adds the
blocks up with their log-sum-exp. Splash's public API has no block backward that takes an
outside log-sum-exp, so these are our own, FlashAttention-2 style:

- `block_forward`: the block's output (normalized over the block's keys, float32) and its
  log-sum-exp (-inf for a row that sees none of the block);
- `block_backward`: dq of the block, and dk, dv of the block, given the row's global
  log-sum-exp and D = rowsum(dO * O) of the final output (one kernel for dq, one for dk/dv).

Masks come from positions, not from block indices: a query sees a key when the key's position
(in the original order) is at or before its own and both have the same segment id. So any
order works, the ring's balanced one included. A (query tile, key tile) pair with no allowed
pair by position is skipped (its bounds travel as scalar prefetch). GQA: query head h reads
key/value head h // (heads / kv_heads), never repeated in memory.

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

LANES, SUBLANES = 128, 8
BLOCK_Q, BLOCK_K = 512, 512  # the largest tiles used (clipped to divisors of the lengths)
_TRANS_B = (((1,), (1,)), ((), ()))  # contract the last dims: q @ k.T


def _tile(length: int, target: int, multiple: int) -> int:
    """The largest divisor of `length` up to `target`, a multiple of `multiple` where one
    is (Mosaic's tiles: 8 rows, 128 lanes), else any (the interpreter takes any)."""
    divisors = [t for t in range(1, min(length, target) + 1) if length % t == 0]
    return max([t for t in divisors if t % multiple == 0] or divisors)


def _widen(x, n: int):
    """A lane-broadcast [rows, 128] array as [rows, n] (n a multiple of 128, or below it)."""
    if n <= x.shape[1]:
        return x[:, :n]
    return jnp.tile(x, (1, n // x.shape[1]))


def _mask(q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, block_k: int):
    """[block_q, block_k]: causal by position, within one segment."""
    q_pos, q_seg = _widen(q_pos_ref[...], block_k), _widen(q_seg_ref[...], block_k)
    k_pos, k_seg = k_pos_ref[:1, :], k_seg_ref[:1, :]
    return (k_pos <= q_pos) & (k_seg == q_seg)


def _scores(q, k, scale):
    s = jax.lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32)
    return s * scale


def _kv_head(head, group: int):
    """The key/value head a query head reads (lax.div: jnp's // lowers a sign op that
    Mosaic cannot lower without a TPU at hand)."""
    return jax.lax.div(head, group)


def _run(q_last_ref, k_first_ref, i, j):
    """Whether query tile i and key tile j have any allowed pair by position."""
    return k_first_ref[j] <= q_last_ref[i]


# ---------------------------------------------------------------------------- forward


def _forward_kernel(
    q_last_ref,
    k_first_ref,
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    k_pos_ref,
    q_seg_ref,
    k_seg_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    scale,
):
    i, j = pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_run(q_last_ref, k_first_ref, i, j))
    def _():
        mask = _mask(q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, block_k)
        s = jnp.where(mask, _scores(q_ref[...], k_ref[...], scale), -jnp.inf)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [block_q, 128], lane-broadcast
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row with nothing allowed yet
        p = jnp.where(mask, jnp.exp(s - _widen(m_safe, block_k)), 0.0)
        alpha = jnp.exp(m_prev - m_safe)
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_scr[...] = _widen(alpha, acc_scr.shape[1]) * acc_scr[...] + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l, m = l_scr[...], m_scr[...]
        empty = l == 0.0
        o_ref[...] = acc_scr[...] / _widen(jnp.where(empty, 1.0, l), o_ref.shape[1])
        lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


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
        functools.partial(_forward_kernel, scale=scale),
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


# ---------------------------------------------------------------------------- backward


def _probs_and_ds(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    k_pos_ref,
    q_seg_ref,
    k_seg_ref,
    scale,
):
    """The block's probabilities (by the global log-sum-exp) and dS = P * (dP - D)."""
    block_k = k_ref.shape[0]
    mask = _mask(q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, block_k)
    s = _scores(q_ref[...], k_ref[...], scale)
    p = jnp.where(mask, jnp.exp(s - _widen(lse_ref[...], block_k)), 0.0)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], _TRANS_B, preferred_element_type=jnp.float32)
    return p, p * (dp - _widen(delta_ref[...], block_k))


def _dq_kernel(
    q_last_ref,
    k_first_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    k_pos_ref,
    q_seg_ref,
    k_seg_ref,
    dq_ref,
    dq_scr,
    *,
    scale,
):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_run(q_last_ref, k_first_ref, i, j))
    def _():
        _, ds = _probs_and_ds(
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            q_pos_ref,
            k_pos_ref,
            q_seg_ref,
            k_seg_ref,
            scale,
        )
        dq_scr[...] += scale * jax.lax.dot(
            ds.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = dq_scr[...]


def _dkv_kernel(
    q_last_ref,
    k_first_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_pos_ref,
    k_pos_ref,
    q_seg_ref,
    k_seg_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    scale,
):
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_run(q_last_ref, k_first_ref, i, j))
    def _():
        p, ds = _probs_and_ds(
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            q_pos_ref,
            k_pos_ref,
            q_seg_ref,
            k_seg_ref,
            scale,
        )
        dv_scr[...] += jax.lax.dot(
            p.astype(do_ref.dtype).T, do_ref[...], preferred_element_type=jnp.float32
        )
        dk_scr[...] += scale * jax.lax.dot(
            ds.astype(q_ref.dtype).T, q_ref[...], preferred_element_type=jnp.float32
        )

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _():
        dk_ref[...] = dk_scr[...]
        dv_ref[...] = dv_scr[...]


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
        functools.partial(_dq_kernel, scale=scale),
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
        functools.partial(_dkv_kernel, scale=scale),
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
