"""The ring: keys and values travel round the sequence shards while each shard adds up its
queries' attention to the block it holds; one driver, one custom VJP, any block backend.

At ring step s a shard holds the keys of shard (me - s) % n. The forward keeps a running
state from which the output and the log-sum-exp come at the end; the backward (a custom
VJP) rotates K/V again with their gradients, from the saved q, k, v, output and
log-sum-exp. Why a custom VJP rather than autodiff of the forward loop (the losing variant,
in benchmarks/ring_autodiff.py): autodiff keeps every step's K/V block for the backward;
the custom VJP keeps only the inputs, the output and the log-sum-exp (measured on a v5p-16
compile, benchmarks/results/ring-variants.md).

A block backend (`ring_xla.XlaBlocks`, `ring_pallas.PallasBlocks`) is a frozen dataclass
with: `enter` / `leave` (its layout), `rows` (a shard's length), `start` / `forward` /
`finish` (the running state of one shard's rows over the held block), `delta` and
`backward` (one block's gradients given the global log-sum-exp).
Packed rows: segment ids travel with the keys, so a document may span shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.attention.balanced_order import original_index


def _positions(shard_length: int, shards: int, axes):
    """The original positions of every shard's rows [shards, shard_length] and this shard's
    number."""
    index = original_index(shard_length * shards, shards).reshape(shards, shard_length)
    return jnp.asarray(index), jax.lax.axis_index(axes)


def _to_next(a, axes, shards: int):
    """`a` passed on to the next shard of the ring."""
    return jax.lax.ppermute(a, axes, [(i, (i + 1) % shards) for i in range(shards)])


def forward(blocks, q, k, v, seg, axes, shards: int):
    """Output (q's dtype) and log-sum-exp of this shard's queries over every shard's keys,
    all in the backend's layout. Differentiable by autodiff where the backend is."""
    index, me = _positions(blocks.rows(q), shards, axes)
    q_index = index[me]
    state = blocks.start(q)
    k_seg = seg
    for step in range(shards):
        state = blocks.forward(
            state, q, k, v, q_index, index[(me - step) % shards], seg, k_seg, step == 0
        )
        if step < shards - 1:
            k, v = (_to_next(a, axes, shards) for a in (k, v))
            if k_seg is not None:
                k_seg = _to_next(k_seg, axes, shards)
    return blocks.finish(state, q)


def _backward(blocks, q, k, v, seg, out, lse, do, axes, shards: int):
    index, me = _positions(blocks.rows(q), shards, axes)
    q_index = index[me]
    delta = blocks.delta(do, out)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    k_seg = seg
    for step in range(shards):
        dq, dk, dv = blocks.backward(
            (dq, dk, dv),
            q,
            k,
            v,
            do,
            delta,
            lse,
            q_index,
            index[(me - step) % shards],
            seg,
            k_seg,
            step == 0,
        )
        # The key block's gradients travel with it; after the last step one more hop
        # brings them home.
        dk, dv = (_to_next(a, axes, shards) for a in (dk, dv))
        if step < shards - 1:
            k, v = (_to_next(a, axes, shards) for a in (k, v))
            if k_seg is not None:
                k_seg = _to_next(k_seg, axes, shards)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring(q, k, v, seg, axes, shards, blocks):
    return forward(blocks, q, k, v, seg, axes, shards)[0]


def _ring_fwd(q, k, v, seg, axes, shards, blocks):
    out, lse = forward(blocks, q, k, v, seg, axes, shards)
    return out, (q, k, v, seg, out, lse)


def _ring_bwd(axes, shards, blocks, residuals, do):
    q, k, v, seg, out, lse = residuals
    return (*_backward(blocks, q, k, v, seg, out, lse, do, axes, shards), None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, seg, axes, shards: int, blocks):
    """Per shard (inside shard_map): q [b, 2c, h, d], k, v [b, 2c, kv, d], seg [b, 2c] or
    None, in the balanced order; `axes` the mesh axes of the sequence."""
    out = _ring(*blocks.enter(q, k, v, seg), axes, shards, blocks)
    return blocks.leave(out, q.shape)
