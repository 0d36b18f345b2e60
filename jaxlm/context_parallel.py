"""Context parallelism: causal attention over a sequence split across devices (`mesh.sequence`).

A row of length l is cut into 2n chunks of c = l / 2n tokens for n sequence shards. Causal
attention gives late chunks more keys than early ones, so contiguous shards would leave shard 0
idle while the last computes most of the triangle. `balance` reorders every row so that shard i
holds chunks i and 2n-1-i: each shard then sees the same number of (query, key) pairs. The
Transformer balances its inputs once on entry and restores the order once on exit; in between,
only attention needs to know, through `original_index`.

Attention runs in one `jax.shard_map` over rows ("batch"), heads ("act_heads") and the
sequence ("length"), with one of two strategies (`model.context_parallel`):

- `all_gather`: each shard keeps its queries and gathers every key and value (their gradients
  come back as a reduce-scatter). Simple, one collective per layer, and the per-shard block
  runs in the best kernel there is (splash on TPU, with a mask in balanced order).
- `ring`: keys and values travel round the shards with `lax.ppermute` while each shard keeps a
  running softmax (max, sum, output); no shard ever holds more than two shards' K/V, and the
  backward pass (a custom VJP) rotates them again with their gradients. Memory grows with l/n
  rather than l; each step's transfer can overlap the block's compute. The blocks run in our
  Pallas flash kernels on TPU (jaxlm.ring_kernels: a block's output and log-sum-exp forward,
  dq and dk/dv backward from the global log-sum-exp; splash's public API has no such block
  backward), in XLA ops on CPU and GPU (query tiles of QUERY_TILE, additive-bias masks, only
  the half of an off-diagonal block that has allowed pairs).

  Why a custom VJP rather than autodiff of the forward loop (RING_BACKWARD="autodiff", kept
  for the comparison; each query tile under jax.checkpoint so no scores are kept): autodiff
  keeps every step's K/V block (and each tile's inputs) for the backward, where the custom VJP keeps
  only q, k, v, the output and the log-sum-exp and rotates K/V again. Compiled for v5p-16 (7B,
  32k rows over 4 shards, benchmarks/ring_variants.py, results/ring-variants.md) autodiff
  needs 0.70 GiB more temporaries per chip and XLA estimates its layer 3% slower.

Packed rows: segment ids travel with the keys, so a document may span shards.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxlm import ring_kernels
from jaxlm import sharding as sharding_lib

STRATEGIES = ("all_gather", "ring")


# ---------------------------------------------------------------- the balanced order


def balance(x, shards: int, axis: int = 1):
    """Reorder `axis` (length l, divisible by 2 * shards) so that shard i of an even split
    holds chunks i and 2*shards-1-i of the original order."""
    x = jnp.moveaxis(x, axis, 0)
    chunks = x.reshape(2 * shards, -1, *x.shape[1:])
    pairs = jnp.stack([chunks[:shards], chunks[shards:][::-1]], axis=1)  # [n, 2, c, ...]
    return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def restore(x, shards: int, axis: int = 1):
    """The inverse of `balance`."""
    x = jnp.moveaxis(x, axis, 0)
    pairs = x.reshape(shards, 2, -1, *x.shape[1:])
    chunks = jnp.concatenate([pairs[:, 0], pairs[:, 1][::-1]], axis=0)
    return jnp.moveaxis(chunks.reshape(x.shape), 0, axis)


def original_index(length: int, shards: int) -> np.ndarray:
    """Position in the original row of each position of the balanced row (host constant)."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.stack([chunks[:shards], chunks[shards:][::-1]], axis=1).reshape(-1)


# ---------------------------------------------------------------- the mesh


def sequence_shards() -> int:
    """How many ways the traced mesh (jax.set_mesh) splits the logical axis "length"."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return sharding_lib.axes_size(mesh, nn.logical_to_mesh_axes(("length",))[0])


# ---------------------------------------------------------------- per-shard blocks (XLA)


def _scores(q, k):
    """q [b, t, kv, g, d], k [b, s, kv, d] -> float32 scaled scores [b, kv, g, t, s]."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    return scores * (q.shape[-1] ** -0.5)


def _mask(q_index, k_index, q_seg, k_seg):
    """[b or 1, 1, 1, t, s]: causal in the original order, within one segment."""
    mask = (k_index[None, :] <= q_index[:, None])[None, None, None]
    if q_seg is None:
        return mask
    return mask & (q_seg[:, None, None, :, None] == k_seg[:, None, None, None, :])


def _group(q, n_kv):
    b, t, h, d = q.shape
    return q.reshape(b, t, n_kv, h // n_kv, d)


def _gathered_block(q, k, v, q_index, k_index, q_seg, k_seg):
    """Exact softmax attention of local grouped queries over all (gathered) keys."""
    scores = jnp.where(_mask(q_index, k_index, q_seg, k_seg), _scores(q, k),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


# ---------------------------------------------------------------- all_gather


def _all_gather_xla(q, k, v, seg, axes, shards):
    """Per shard: q [b, 2c, h, d]; k, v [b, 2c, kv, d]; seg [b, 2c] or None."""
    length = q.shape[1] * shards
    index = jnp.asarray(original_index(length, shards))
    q_index = index.reshape(shards, -1)[jax.lax.axis_index(axes)]
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    k_seg = None if seg is None else gather(seg)
    out = _gathered_block(_group(q, k.shape[2]), gather(k), gather(v), q_index, index, seg, k_seg)
    return out.reshape(q.shape)


class _BalancedCausalMask(splash.Mask):
    """Splash's mask for a whole row in the balanced order: causal in the original order."""

    def __init__(self, length: int, shards: int):
        self._length, self._index = length, original_index(length, shards)

    @property
    def shape(self):
        return (self._length, self._length)

    def __getitem__(self, idx):
        rows, cols = idx
        return self._index[rows][:, None] >= self._index[cols][None, :]


def _splash_kernel(length, shards, heads, head_shards, blocks, interpret):
    mask = splash.MultiHeadMask([_BalancedCausalMask(length, shards)] * heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=head_shards,
                                  q_seq_shards=shards, interpret=interpret)


def _all_gather_splash(kernel, q, k, v, seg, axes):
    """Per shard, in splash's layout: q [b, h, 2c, d]; k, v [b, kv, 2c, d]; seg [b, 2c]."""
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
    k, v, k_seg = gather(k, axis=2), gather(v, axis=2), gather(seg, axis=1)
    ids = splash.SegmentIds(q=seg, kv=k_seg)
    return jax.vmap(kernel)(q, k, v, ids)


# ---------------------------------------------------------------- ring


def _ring_positions(shard_length: int, shards: int, axes):
    """The original positions of every shard's rows [shards, shard_length] and this shard's
    number: at ring step s a shard holds the keys of shard (me - s) % shards."""
    index = original_index(shard_length * shards, shards).reshape(shards, shard_length)
    return jnp.asarray(index), jax.lax.axis_index(axes)


def _ring_steps(shards):
    """ppermute pairs passing each shard's block to the next shard."""
    return [(i, (i + 1) % shards) for i in range(shards)]


def _ring_blocks(q_index, k_index):
    """For the held key block: which (query rows, key columns) can have allowed pairs.

    In the balanced order each shard holds chunks (i, 2n-1-i) of queries and, at ring step s,
    keys of shard j = i - s (mod n). Besides the diagonal step (j == i, the whole block with the
    causal mask), exactly half the block matters: if j < i, every query against the first key
    chunk; if j > i, the second query chunk against every key. Returned as two static
    (row slice, column slice) choices and a flag picking one of them.
    """
    c = q_index.shape[0] // 2
    later = q_index[0] > k_index[0]  # j < i: the first key chunk is before both query chunks
    return later, (slice(None), slice(0, c)), (slice(c, None), slice(None))


QUERY_TILE = 512  # ring blocks run this many queries at a time: scores are tile x keys


def _query_tile(rows: int) -> int:
    """The largest divisor of `rows` up to QUERY_TILE."""
    return max(t for t in range(1, min(rows, QUERY_TILE) + 1) if rows % t == 0)


def _to_tiles(a, tile, axis):
    """Split `axis` (rows) into [rows / tile, tile] and bring the tile count to the front."""
    if a is None:
        return None
    axis %= a.ndim
    return jnp.moveaxis(a.reshape(*a.shape[:axis], -1, tile, *a.shape[axis + 1:]), axis, 0)


def _from_tiles(a, axis):
    """The inverse of _to_tiles (`axis` as in the untiled array)."""
    axis %= a.ndim - 1
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(*a.shape[:axis], -1, *a.shape[axis + 2:])


def _put(full, part, where: slice, axis: int):
    """`full` with `part` in the static slice `where` of `axis`, by concatenation (a
    dynamic-update-slice inside lax.cond's branches trips libtpu's copy insertion)."""
    axis %= full.ndim
    start, stop, _ = where.indices(full.shape[axis])
    pieces = [jax.lax.slice_in_dim(full, 0, start, axis=axis), part,
              jax.lax.slice_in_dim(full, stop, full.shape[axis], axis=axis)]
    return jnp.concatenate([p for p in pieces if p.shape[axis]], axis=axis)


def _partial_update(state, q, k, v, q_index, k_index, q_seg, k_seg, rows, cols,
                    remat: bool = False):
    """Online-softmax update of the running (max, sum, out) rows `rows` by keys `cols`, a
    tile of queries at a time (each row's update is independent of the others). `remat`:
    for autodiff, each tile's scores are recomputed in the backward rather than kept."""
    m, l, o = state
    kc, vc, kic = k[:, cols], v[:, cols], k_index[cols]
    ksc = None if k_seg is None else k_seg[:, cols]

    def update(qt, qit, qst, m_old, l_old, o_old):
        # An additive bias [b, 1, 1, t, s]: a boolean mask broadcast over the heads by
        # jnp.where was kept per tile by XLA (2 GiB at 7B, 32k rows, 4 shards).
        s = _scores(qt, kc) + jnp.where(_mask(qit, kic, qst, ksc), 0.0, -jnp.inf)
        # The running max only keeps exp() in range; the result does not depend on it, so
        # autodiff need not see it (and a fully masked row's -inf would give NaN through it).
        m_new = jax.lax.stop_gradient(jnp.maximum(m_old, jnp.max(s, axis=-1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m_old - m_safe)
        l_new = alpha * l_old + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgts,bskd->btkgd", p.astype(vc.dtype), vc,
                        preferred_element_type=jnp.float32)
        return m_new, l_new, jnp.moveaxis(alpha, -1, 1)[..., None] * o_old + pv

    if remat:
        update = jax.checkpoint(update)
    row_args = (q[:, rows], q_index[rows], None if q_seg is None else q_seg[:, rows],
                m[..., rows], l[..., rows], o[:, rows])
    axes = (1, 0, 1, -1, -1, 1)
    tile = _query_tile(row_args[1].shape[0])
    if tile == row_args[1].shape[0]:  # one tile: no loop
        m_new, l_new, o_new = update(*row_args)
    else:
        tiles = tuple(_to_tiles(a, tile, ax) for a, ax in zip(row_args, axes))
        new = jax.lax.map(lambda xs: update(*xs), tiles)
        m_new, l_new, o_new = (_from_tiles(a, ax) for a, ax in zip(new, (-1, -1, 1)))
    return _put(m, m_new, rows, -1), _put(l, l_new, rows, -1), _put(o, o_new, rows, 1)


def _ring_forward(q, k, v, q_seg, axes, shards, remat: bool = False):
    """q [b, 2c, kv, g, d] grouped; returns out (q's dtype) and the log-sum-exp [b, kv, g, 2c].
    `remat`: differentiable by autodiff with each query tile's scores recomputed (see
    RING_BACKWARD)."""
    index, me = _ring_positions(q.shape[1], shards, axes)
    q_index = index[me]
    b, t, kv, g, d = q.shape
    state = (jnp.full((b, kv, g, t), -jnp.inf), jnp.zeros((b, kv, g, t)),
             jnp.zeros((b, t, kv, g, d), jnp.float32))
    k_seg = q_seg
    for step in range(shards):
        k_index = index[(me - step) % shards]
        def update(state, rows, cols, k=k, v=v, k_index=k_index, k_seg=k_seg):
            return _partial_update(state, q, k, v, q_index, k_index, q_seg, k_seg, rows, cols,
                                   remat)

        if step == 0:
            state = update(state, slice(None), slice(None))
        else:
            later, first, second = _ring_blocks(q_index, k_index)
            state = jax.lax.cond(later, lambda st: update(st, *first),
                                 lambda st: update(st, *second), state)
        if step < shards - 1:
            k, v = (jax.lax.ppermute(a, axes, _ring_steps(shards)) for a in (k, v))
            if k_seg is not None:
                k_seg = jax.lax.ppermute(k_seg, axes, _ring_steps(shards))
    m, l, o = state
    out = o / jnp.moveaxis(l, -1, 1)[..., None]
    return out.astype(q.dtype), m + jnp.log(l)


def _partial_grads(q, k, v, do, delta, lse, q_index, k_index, q_seg, k_seg, rows, cols):
    """Gradient pieces of the block (rows, cols): dq of the rows, dk and dv of the columns
    (float32), a tile of queries at a time."""
    scale = q.shape[-1] ** -0.5
    kc, vc, kic = k[:, cols], v[:, cols], k_index[cols]
    ksc = None if k_seg is None else k_seg[:, cols]

    def tile_grads(carry, xs):
        qt, qit, qst, dot, delta_t, lse_t = xs
        bias = jnp.where(_mask(qit, kic, qst, ksc), 0.0, -jnp.inf)
        p = jnp.exp(_scores(qt, kc) + bias - lse_t[..., None])
        dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(dot.dtype), dot,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgd,bskd->bkgts", dot, vc, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_t[..., None]) * scale).astype(qt.dtype)
        dq = jnp.einsum("bkgts,bskd->btkgd", ds, kc, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, qt, preferred_element_type=jnp.float32)
        return (carry[0] + dk, carry[1] + dv), dq

    row_args = (q[:, rows], q_index[rows], None if q_seg is None else q_seg[:, rows],
                do[:, rows], delta[..., rows], lse[..., rows])
    zeros = jnp.zeros(kc.shape, jnp.float32), jnp.zeros(vc.shape, jnp.float32)
    tile = _query_tile(row_args[1].shape[0])
    if tile == row_args[1].shape[0]:  # one tile: no loop
        (dk, dv), dq = tile_grads(zeros, row_args)
        return dq, dk, dv
    tiles = tuple(_to_tiles(a, tile, ax) for a, ax in zip(row_args, (1, 0, 1, 1, -1, -1)))
    (dk, dv), dq = jax.lax.scan(tile_grads, zeros, tiles)
    return _from_tiles(dq, 1), dk, dv


def _ring_backward(q, k, v, q_seg, out, lse, do, axes, shards):
    index, me = _ring_positions(q.shape[1], shards, axes)
    q_index = index[me]
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), out.astype(jnp.float32))
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    k_seg = q_seg

    def accumulate(grads, rows, cols):
        dq, dk, dv = grads
        pq, pk, pv = _partial_grads(q, k, v, do, delta, lse, q_index, k_index, q_seg, k_seg,
                                    rows, cols)
        return (_put(dq, dq[:, rows] + pq, rows, 1), _put(dk, dk[:, cols] + pk, cols, 1),
                _put(dv, dv[:, cols] + pv, cols, 1))

    for step in range(shards):
        k_index = index[(me - step) % shards]
        if step == 0:
            dq, dk, dv = accumulate((dq, dk, dv), slice(None), slice(None))
        else:
            later, first, second = _ring_blocks(q_index, k_index)
            dq, dk, dv = jax.lax.cond(later, lambda g, a=first: accumulate(g, *a),
                                      lambda g, a=second: accumulate(g, *a), (dq, dk, dv))
        # The key block's gradients travel with it; after the last step one more hop
        # brings them home.
        dk, dv = (jax.lax.ppermute(a, axes, _ring_steps(shards)) for a in (dk, dv))
        if step < shards - 1:
            k, v = (jax.lax.ppermute(a, axes, _ring_steps(shards)) for a in (k, v))
            if k_seg is not None:
                k_seg = jax.lax.ppermute(k_seg, axes, _ring_steps(shards))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q, k, v, q_seg, axes, shards):
    return _ring_forward(q, k, v, q_seg, axes, shards)[0]


def _ring_fwd(q, k, v, q_seg, axes, shards):
    out, lse = _ring_forward(q, k, v, q_seg, axes, shards)
    return out, (q, k, v, q_seg, out, lse)


def _ring_bwd(axes, shards, residuals, do):
    q, k, v, q_seg, out, lse = residuals
    dq, dk, dv = _ring_backward(q, k, v, q_seg, out, lse, do, axes, shards)
    return dq, dk, dv, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# How the ring's backward pass is had: "custom_vjp" (_ring_backward rotates K/V again with
# their gradients) or "autodiff" (JAX differentiates the forward loop, each query tile under
# jax.checkpoint). Private: benchmarks/ring_variants.py measures both; see the module doc.
RING_BACKWARD = "custom_vjp"
RING_BACKWARDS = ("custom_vjp", "autodiff")
# Whether the ring's blocks run in jaxlm.ring_kernels' Pallas kernels where attention would
# be splash (TPU; Pallas' interpreter elsewhere when asked), rather than in XLA ops.
RING_KERNEL = True


def _ring_xla(q, k, v, seg, axes, shards):
    if RING_BACKWARD not in RING_BACKWARDS:
        raise ValueError(f"RING_BACKWARD={RING_BACKWARD!r}; use one of {RING_BACKWARDS}")
    grouped = _group(q, k.shape[2])
    if RING_BACKWARD == "autodiff":
        out = _ring_forward(grouped, k, v, seg, axes, shards, remat=True)[0]
    else:
        out = _ring(grouped, k, v, seg, axes, shards)
    return out.reshape(q.shape)


# ---------------------------------------------------------------- ring, Pallas blocks


def _ring_kernel_forward(q, k, v, seg, axes, shards, interpret):
    """Kernel layout: q [b, h, 2c, d], k, v [b, kv, 2c, d], seg [b, 2c]. Each step's block
    comes from jaxlm.ring_kernels (which skips the tiles the mask empties) and is added to
    the running (out, log-sum-exp). Returns float32 out and lse [b, h, 2c]."""
    index, me = _ring_positions(q.shape[2], shards, axes)
    block = functools.partial(ring_kernels.block_forward, scale=q.shape[-1] ** -0.5,
                              interpret=interpret)
    k_seg = seg
    for step in range(shards):
        out_b, lse_b = block(q, k, v, index[me], index[(me - step) % shards], seg, k_seg)
        if step == 0:  # the diagonal block: every row sees itself, so lse is finite after it
            out, lse = out_b, lse_b
        else:
            new = jnp.logaddexp(lse, lse_b)
            out = (out * jnp.exp(lse - new)[..., None] + out_b * jnp.exp(lse_b - new)[..., None])
            lse = new
        if step < shards - 1:
            k, v, k_seg = (jax.lax.ppermute(a, axes, _ring_steps(shards)) for a in (k, v, k_seg))
    return out, lse


def _ring_kernel_backward(q, k, v, seg, out, lse, do, axes, shards, interpret):
    index, me = _ring_positions(q.shape[2], shards, axes)
    block = functools.partial(ring_kernels.block_backward, scale=q.shape[-1] ** -0.5,
                              interpret=interpret)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    k_seg = seg
    for step in range(shards):
        pq, pk, pv = block(q, k, v, index[me], index[(me - step) % shards], seg, k_seg, do,
                           lse, delta)
        dq, dk, dv = dq + pq, dk + pk, dv + pv
        # The key block's gradients travel with it; one more hop after the last step.
        dk, dv = (jax.lax.ppermute(a, axes, _ring_steps(shards)) for a in (dk, dv))
        if step < shards - 1:
            k, v, k_seg = (jax.lax.ppermute(a, axes, _ring_steps(shards)) for a in (k, v, k_seg))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_kernel(q, k, v, seg, axes, shards, interpret):
    return _ring_kernel_forward(q, k, v, seg, axes, shards, interpret)[0].astype(q.dtype)


def _ring_kernel_fwd(q, k, v, seg, axes, shards, interpret):
    out, lse = _ring_kernel_forward(q, k, v, seg, axes, shards, interpret)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg, out, lse)


def _ring_kernel_bwd(axes, shards, interpret, residuals, do):
    q, k, v, seg, out, lse = residuals
    return (*_ring_kernel_backward(q, k, v, seg, out, lse, do, axes, shards, interpret), None)


_ring_kernel.defvjp(_ring_kernel_fwd, _ring_kernel_bwd)


def _ring_pallas(q, k, v, seg, axes, shards, interpret):
    """The ring with jaxlm.ring_kernels' blocks: q [b, 2c, h, d], k, v [b, 2c, kv, d]."""
    if seg is None:
        seg = jnp.ones(q.shape[:2], jnp.int32)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads first, as the kernels want
    return jnp.swapaxes(_ring_kernel(q, k, v, seg.astype(jnp.int32), axes, shards, interpret),
                        1, 2)


# ---------------------------------------------------------------- entry point


def attention(q, k, v, segment_ids, strategy: str = "all_gather", block_impl: str = "xla",
              splash_blocks=None, splash_interpret: bool = True):
    """Causal GQA attention of rows in the balanced order, split over the traced mesh.

    q [b, l, h, d], k, v [b, l, kv, d], segment_ids [b, l] or None, all in the balanced order
    (`balance`) and sharded as ("batch", "length", heads). `block_impl` "splash" (what the
    model passes on TPU) runs the all_gather strategy's block in the splash kernel
    (`splash_blocks`: its BlockSizes) and the ring's blocks in jaxlm.ring_kernels; both in
    Pallas' interpreter with `splash_interpret`. "xla": XLA ops.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; use one of {STRATEGIES}")
    mesh = jax.sharding.get_abstract_mesh()
    rows, length_axes, heads = nn.logical_to_mesh_axes(("batch", "length", "act_heads"))
    axes = sharding_lib.mesh_axes(length_axes)
    shards = sharding_lib.axes_size(mesh, length_axes)
    if q.shape[1] % (2 * shards):
        raise ValueError(f"context parallelism over {shards} shards needs a row length "
                         f"divisible by {2 * shards}; got {q.shape[1]}")
    axes = axes[0] if len(axes) == 1 else axes
    seq_spec = P(rows, length_axes, heads)
    if strategy == "all_gather" and block_impl == "splash":
        head_shards = sharding_lib.axes_size(mesh, heads)
        kernel = _splash_kernel(q.shape[1], shards, q.shape[2], head_shards, splash_blocks,
                                splash_interpret)
        kernel_spec = kernel.manual_sharding_spec(
            jax.sharding.NamedSharding(mesh, P(heads, length_axes)))
        if segment_ids is None:
            segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))  # [b, h, l, d]
        spec = P(rows, heads, length_axes)
        out = jax.shard_map(
            functools.partial(_all_gather_splash, axes=axes), mesh=mesh, check_vma=False,
            in_specs=(kernel_spec, spec, spec, spec, P(rows, length_axes)), out_specs=spec,
        )(kernel, q, k, v, segment_ids)
        return jnp.swapaxes(out, 1, 2)
    block = _all_gather_xla if strategy == "all_gather" else _ring_xla
    if strategy == "ring" and block_impl == "splash" and RING_KERNEL:
        block = functools.partial(_ring_pallas, interpret=splash_interpret)
    seg_spec = () if segment_ids is None else (P(rows, length_axes),)

    def per_shard(q, k, v, *seg):
        return block(q, k, v, seg[0] if seg else None, axes, shards)

    args = (q, k, v) + (() if segment_ids is None else (segment_ids,))
    return jax.shard_map(per_shard, mesh=mesh, check_vma=False,
                         in_specs=(seq_spec, seq_spec, seq_spec) + seg_spec,
                         out_specs=seq_spec)(*args)
