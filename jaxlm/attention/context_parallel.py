"""Context parallelism: causal attention over a sequence split across devices (`mesh.sequence`).

Rows arrive in the balanced order (jaxlm.attention.balanced_order). Attention runs in one
`jax.shard_map` over rows ("batch"), heads ("act_heads") and the sequence ("length"), with
one of two strategies (`model.context_parallel`):

- `all_gather`: each shard keeps its queries and gathers every key and value (their gradients
  come back as a reduce-scatter). Simple, one collective per layer, and the per-shard block
  runs in the best kernel there is (splash on TPU, with a mask in balanced order).
- `ring`: keys and values travel round the shards with `lax.ppermute` while each shard keeps a
  running softmax; no shard ever holds more than two shards' K/V (jaxlm.attention.ring).
  Memory grows with l/n rather than l; each step's transfer can overlap the block's compute.
  Its blocks run in our Pallas flash kernels on TPU (jaxlm.attention.ring_kernels: splash's
  public API has no block backward that takes an outside log-sum-exp), in XLA ops on CPU
  and GPU (jaxlm.attention.ring_xla).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm import mesh_axes
from jaxlm.attention import ring, ring_pallas, ring_xla, splash
from jaxlm.attention.balanced_order import original_index
from jaxlm.attention.xla import causal_mask, group_heads, grouped_scores

STRATEGIES = ("all_gather", "ring")
BLOCK_IMPLS = ("xla", "splash")  # "splash": the Pallas kernels (splash, the ring's own)


def _gathered_block(q, k, v, q_index, k_index, q_seg, k_seg):
    """Exact softmax attention of local grouped queries over all (gathered) keys.

    Normalised before the PV product, unlike jaxlm.attention.xla's (after it): merging the
    two would change this path's rounding."""
    scores = jnp.where(
        causal_mask(q_index, k_index, q_seg, k_seg),
        grouped_scores(q, k),
        jnp.finfo(jnp.float32).min,
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _all_gather_xla(q, k, v, seg, axes, shards):
    """Per shard: q [b, 2c, h, d]; k, v [b, 2c, kv, d]; seg [b, 2c] or None."""
    length = q.shape[1] * shards
    index = jnp.asarray(original_index(length, shards))
    q_index = index.reshape(shards, -1)[jax.lax.axis_index(axes)]
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    k_seg = None if seg is None else gather(seg)
    out = _gathered_block(
        group_heads(q, k.shape[2]), gather(k), gather(v), q_index, index, seg, k_seg
    )
    return out.reshape(q.shape)


def attention(
    q,
    k,
    v,
    segment_ids,
    strategy: str = "all_gather",
    block_impl: str = "xla",
    splash_blocks=None,
    splash_interpret: bool = True,
):
    """Causal GQA attention of rows in the balanced order, split over the traced mesh.

    q [b, l, h, d], k, v [b, l, kv, d], segment_ids [b, l] or None, all in the balanced order
    (`balance`) and sharded as ("batch", "length", heads). `block_impl` "splash" (TPU) runs
    the all_gather strategy's block in the splash kernel (`splash_blocks`: its BlockSizes)
    and the ring's blocks in jaxlm.attention.ring_pallas; both in Pallas' interpreter with
    `splash_interpret`. "xla": XLA ops.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; use one of {STRATEGIES}")
    if block_impl not in BLOCK_IMPLS:
        raise ValueError(f"unknown block implementation {block_impl!r}; use one of {BLOCK_IMPLS}")
    mesh = jax.sharding.get_abstract_mesh()
    rows, length_axes, heads = nn.logical_to_mesh_axes(("batch", "length", "act_heads"))
    axes = mesh_axes.spec_axes(length_axes)
    shards = mesh_axes.axes_size(mesh, length_axes)
    if q.shape[1] % (2 * shards):
        raise ValueError(
            f"context parallelism over {shards} shards needs a row length "
            f"divisible by {2 * shards}; got {q.shape[1]}"
        )
    axes = axes[0] if len(axes) == 1 else axes
    seq_spec = P(rows, length_axes, heads)
    if strategy == "all_gather" and block_impl == "splash":
        return splash.all_gather_splash(q, k, v, segment_ids, axes, splash_blocks, splash_interpret)
    if strategy == "all_gather":
        block = _all_gather_xla
    else:
        blocks = (
            ring_pallas.PallasBlocks(splash_interpret)
            if block_impl == "splash"
            else ring_xla.XlaBlocks()
        )
        block = functools.partial(ring.ring_attention, blocks=blocks)
    seg_spec = () if segment_ids is None else (P(rows, length_axes),)

    def per_shard(q, k, v, *seg):
        return block(q, k, v, seg[0] if seg else None, axes, shards)

    args = (q, k, v) + (() if segment_ids is None else (segment_ids,))
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        check_vma=False,
        in_specs=(seq_spec, seq_spec, seq_spec) + seg_spec,
        out_specs=seq_spec,
    )(*args)
