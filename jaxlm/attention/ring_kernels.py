"""Flash-attention block kernels in Pallas (TPU) for the ring (jaxlm.attention.ring): what
one grid step computes on its tiles. jaxlm.attention.ring_pallas launches them over a block
(`block_forward`, `block_backward`) and is the ring's block backend (`PallasBlocks`).

A ring step attends one shard's queries to the key/value block it holds, and the ring adds the
blocks up with their log-sum-exp. Splash's public API has no block backward that takes an
outside log-sum-exp, so these are our own, FlashAttention-2 style:

- `forward_kernel`: the block's output (normalized over the block's keys, float32) and its
  log-sum-exp (-inf for a row that sees none of the block);
- `dq_kernel`, `dkv_kernel`: dq of the block, and dk, dv of the block, given the row's global
  log-sum-exp and D = rowsum(dO * O) of the final output.

Masks come from positions, not from block indices: a query sees a key when the key's position
(in the original order) is at or before its own and both have the same segment id. So any
order works, the ring's balanced one included. A (query tile, key tile) pair with no allowed
pair by position is skipped (its bounds travel as scalar prefetch).

Tiles: q, do [block_q, d], k, v [block_k, d]; row vectors (lse, D, query positions and
segment ids) lane-broadcast [block_q, 128]; key positions and segment ids sublane-broadcast
[8, block_k].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_TRANS_B = (((1,), (1,)), ((), ()))  # contract the last dims: q @ k.T


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


def _run(q_last_ref, k_first_ref, i, j):
    """Whether query tile i and key tile j have any allowed pair by position."""
    return k_first_ref[j] <= q_last_ref[i]


# ---------------------------------------------------------------------------- forward


def forward_kernel(
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
    """Grid (batch, head, query tile i, key tile j): the running max, sum and output of
    tile i over key tiles 0..j, written out normalized at the last j."""
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


def dq_kernel(
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
    """Grid (batch, head, query tile i, key tile j): dq of tile i summed over key tiles."""
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


def dkv_kernel(
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
    """Grid (batch, kv head, key tile j, head g of the group, query tile i): dk, dv of key
    tile j summed over the group's heads and the query tiles."""
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
