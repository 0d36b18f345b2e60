"""The ring's blocks in XLA ops (CPU, GPU): query tiles of QUERY_TILE, additive-bias masks,
and only the half of an off-diagonal block that has allowed pairs.

Layout: q grouped [b, t, kv, g, d]; k, v [b, s, kv, d]; segment ids [b, t] or None.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.attention.xla import causal_mask, group_heads, grouped_scores

QUERY_TILE = 512  # ring blocks run this many queries at a time: scores are tile x keys


def _query_tile(rows: int) -> int:
    """The largest divisor of `rows` up to QUERY_TILE."""
    return max(t for t in range(1, min(rows, QUERY_TILE) + 1) if rows % t == 0)


def _to_tiles(a, tile, axis):
    """Split `axis` (rows) into [rows / tile, tile] and bring the tile count to the front."""
    if a is None:
        return None
    axis %= a.ndim
    return jnp.moveaxis(a.reshape(*a.shape[:axis], -1, tile, *a.shape[axis + 1 :]), axis, 0)


def _from_tiles(a, axis):
    """The inverse of _to_tiles (`axis` as in the untiled array)."""
    axis %= a.ndim - 1
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(*a.shape[:axis], -1, *a.shape[axis + 2 :])


def _put(full, part, where: slice, axis: int):
    """`full` with `part` in the static slice `where` of `axis`, by concatenation (a
    dynamic-update-slice inside lax.cond's branches trips libtpu's copy insertion)."""
    axis %= full.ndim
    start, stop, _ = where.indices(full.shape[axis])
    pieces = [
        jax.lax.slice_in_dim(full, 0, start, axis=axis),
        part,
        jax.lax.slice_in_dim(full, stop, full.shape[axis], axis=axis),
    ]
    return jnp.concatenate([p for p in pieces if p.shape[axis]], axis=axis)


def _halves(q_index, k_index):
    """For an off-diagonal key block: which (query rows, key columns) can have allowed pairs.

    In the balanced order each shard holds chunks (i, 2n-1-i) of queries and, at ring step s,
    keys of shard j = i - s (mod n). Besides the diagonal step (j == i, the whole block with the
    causal mask), exactly half the block matters: if j < i, every query against the first key
    chunk; if j > i, the second query chunk against every key. Returned as two static
    (row slice, column slice) choices and a flag picking one of them.
    """
    c = q_index.shape[0] // 2
    later = q_index[0] > k_index[0]  # j < i: the first key chunk is before both query chunks
    return later, (slice(None), slice(0, c)), (slice(c, None), slice(None))


def _on_allowed_part(fn, carry, q_index, k_index, diagonal: bool):
    """fn(carry, rows, cols) on the whole diagonal block, else on the half that matters."""
    if diagonal:
        return fn(carry, slice(None), slice(None))
    later, first, second = _halves(q_index, k_index)
    return jax.lax.cond(later, lambda c: fn(c, *first), lambda c: fn(c, *second), carry)


def _bias(q_index, k_index, q_seg, k_seg):
    """The mask as an additive bias [b, 1, 1, t, s]: a boolean mask broadcast over the heads
    by jnp.where was kept per tile by XLA (benchmarks/results/NOTES.md)."""
    return jnp.where(causal_mask(q_index, k_index, q_seg, k_seg), 0.0, -jnp.inf)


def _partial_update(
    state, q, k, v, q_index, k_index, q_seg, k_seg, rows, cols, remat: bool = False
):
    """Online-softmax update of the running (max, sum, out) rows `rows` by keys `cols`, a
    tile of queries at a time (each row's update is independent of the others). `remat`:
    for autodiff, each tile's scores are recomputed in the backward rather than kept."""
    m, l, o = state
    kc, vc, kic = k[:, cols], v[:, cols], k_index[cols]
    ksc = None if k_seg is None else k_seg[:, cols]

    def update(qt, qit, qst, m_old, l_old, o_old):
        s = grouped_scores(qt, kc) + _bias(qit, kic, qst, ksc)
        # The running max only keeps exp() in range; the result does not depend on it, so
        # autodiff need not see it (and a fully masked row's -inf would give NaN through it).
        m_new = jax.lax.stop_gradient(jnp.maximum(m_old, jnp.max(s, axis=-1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m_old - m_safe)
        l_new = alpha * l_old + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bkgts,bskd->btkgd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32
        )
        return m_new, l_new, jnp.moveaxis(alpha, -1, 1)[..., None] * o_old + pv

    if remat:
        update = jax.checkpoint(update)
    row_args = (
        q[:, rows],
        q_index[rows],
        None if q_seg is None else q_seg[:, rows],
        m[..., rows],
        l[..., rows],
        o[:, rows],
    )
    axes = (1, 0, 1, -1, -1, 1)
    tile = _query_tile(row_args[1].shape[0])
    if tile == row_args[1].shape[0]:  # one tile: no loop
        m_new, l_new, o_new = update(*row_args)
    else:
        tiles = tuple(_to_tiles(a, tile, ax) for a, ax in zip(row_args, axes))
        new = jax.lax.map(lambda xs: update(*xs), tiles)
        m_new, l_new, o_new = (_from_tiles(a, ax) for a, ax in zip(new, (-1, -1, 1)))
    return _put(m, m_new, rows, -1), _put(l, l_new, rows, -1), _put(o, o_new, rows, 1)


def _partial_grads(q, k, v, do, delta, lse, q_index, k_index, q_seg, k_seg, rows, cols):
    """Gradient pieces of the block (rows, cols): dq of the rows, dk and dv of the columns
    (float32), a tile of queries at a time."""
    scale = q.shape[-1] ** -0.5
    kc, vc, kic = k[:, cols], v[:, cols], k_index[cols]
    ksc = None if k_seg is None else k_seg[:, cols]

    def tile_grads(carry, xs):
        qt, qit, qst, dot, delta_t, lse_t = xs
        p = jnp.exp(grouped_scores(qt, kc) + _bias(qit, kic, qst, ksc) - lse_t[..., None])
        dv = jnp.einsum(
            "bkgts,btkgd->bskd", p.astype(dot.dtype), dot, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("btkgd,bskd->bkgts", dot, vc, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_t[..., None]) * scale).astype(qt.dtype)
        dq = jnp.einsum("bkgts,bskd->btkgd", ds, kc, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, qt, preferred_element_type=jnp.float32)
        return (carry[0] + dk, carry[1] + dv), dq

    row_args = (
        q[:, rows],
        q_index[rows],
        None if q_seg is None else q_seg[:, rows],
        do[:, rows],
        delta[..., rows],
        lse[..., rows],
    )
    zeros = jnp.zeros(kc.shape, jnp.float32), jnp.zeros(vc.shape, jnp.float32)
    tile = _query_tile(row_args[1].shape[0])
    if tile == row_args[1].shape[0]:  # one tile: no loop
        (dk, dv), dq = tile_grads(zeros, row_args)
        return dq, dk, dv
    tiles = tuple(_to_tiles(a, tile, ax) for a, ax in zip(row_args, (1, 0, 1, 1, -1, -1)))
    (dk, dv), dq = jax.lax.scan(tile_grads, zeros, tiles)
    return _from_tiles(dq, 1), dk, dv


@dataclasses.dataclass(frozen=True)
class XlaBlocks:
    """The ring's block backend in XLA ops (see jaxlm.attention.ring). `remat`: each query
    tile's scores recomputed when the forward is differentiated by autodiff."""

    remat: bool = False

    def enter(self, q, k, v, seg):
        return group_heads(q, k.shape[2]), k, v, seg

    def leave(self, out, shape):
        return out.reshape(shape)

    def rows(self, q):
        return q.shape[1]

    def start(self, q):
        b, t, kv, g, d = q.shape
        return (
            jnp.full((b, kv, g, t), -jnp.inf),
            jnp.zeros((b, kv, g, t)),
            jnp.zeros((b, t, kv, g, d), jnp.float32),
        )

    def forward(self, state, q, k, v, q_index, k_index, q_seg, k_seg, diagonal: bool):
        def update(state, rows, cols):
            return _partial_update(
                state, q, k, v, q_index, k_index, q_seg, k_seg, rows, cols, self.remat
            )

        return _on_allowed_part(update, state, q_index, k_index, diagonal)

    def finish(self, state, q):
        m, l, o = state
        out = o / jnp.moveaxis(l, -1, 1)[..., None]
        return out.astype(q.dtype), m + jnp.log(l)

    def delta(self, do, out):
        return jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), out.astype(jnp.float32))

    def backward(
        self, grads, q, k, v, do, delta, lse, q_index, k_index, q_seg, k_seg, diagonal: bool
    ):
        def accumulate(grads, rows, cols):
            dq, dk, dv = grads
            pq, pk, pv = _partial_grads(
                q, k, v, do, delta, lse, q_index, k_index, q_seg, k_seg, rows, cols
            )
            return (
                _put(dq, dq[:, rows] + pq, rows, 1),
                _put(dk, dk[:, cols] + pk, cols, 1),
                _put(dv, dv[:, cols] + pv, cols, 1),
            )

        return _on_allowed_part(accumulate, grads, q_index, k_index, diagonal)
