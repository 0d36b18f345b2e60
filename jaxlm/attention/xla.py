"""Causal grouped-query attention in plain XLA ops (any platform), and over a decode cache.

Shapes: q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim];
segment_ids [batch, length] (0 = padding) or None for one document per row. A query
attends to keys at or before its position inside the same segment. GQA groups the query
heads of each kv head ([b, q, kv, group, d]) and never repeats k, v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(q_pos, k_pos, q_seg, k_seg) -> jax.Array:
    """[batch or 1, 1, 1, q, k] boolean: may the query at position q_pos[i] see the key at
    k_pos[j]? Causal by position (any order, the balanced one too), and within one segment
    when segment ids [batch, q] and [batch, k] are given."""
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None, None]
    if q_seg is None:
        return mask
    return mask & same_segment(q_seg, k_seg)


def same_segment(q_seg, k_seg) -> jax.Array:
    """[batch, 1, 1, q, k] boolean: are query i and key j in the same segment?"""
    return q_seg[:, None, None, :, None] == k_seg[:, None, None, None, :]


def grouped_scores(q, k):
    """q [b, t, kv, g, d], k [b, s, kv, d] -> float32 scaled scores [b, kv, g, t, s]."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    return scores * (q.shape[-1] ** -0.5)


def group_heads(q, n_kv: int):
    """[b, t, heads, d] -> [b, t, kv, heads / kv, d]: the query heads of each kv head."""
    b, t, h, d = q.shape
    return q.reshape(b, t, n_kv, h // n_kv, d)


def _block_mask(q_start: int, q_len: int, k_len: int, segment_ids) -> jax.Array:
    """`causal_mask` of queries q_start .. q_start + q_len against keys 0 .. k_len."""
    mask = causal_mask(jnp.arange(q_start, q_start + q_len), jnp.arange(k_len), None, None)
    if segment_ids is None:
        return mask
    return mask & same_segment(segment_ids[:, q_start : q_start + q_len], segment_ids[:, :k_len])


def _attend(q, k, v, mask, scores_dtype=jnp.float32, kv_layout: str = "bskd"):
    """Softmax attention of grouped queries q [b, q, kv, group, d] over k, v laid out as
    `kv_layout` says: [b, s, kv, d] ("bskd") or, a decode cache's, [b, kv, s, d] ("bksd").

    Scores, max and exp in `scores_dtype` (float32 unless a config asks for the compute
    dtype). The softmax is normalised after the PV product, on the [q, d] output, instead of
    on the [q, k] probabilities, and by the sum of the weights as PV uses them (rounded to
    v's dtype), so they sum to exactly 1: fewer and narrower passes over the score-sized
    arrays, forward and backward. The 7B step on v5p-64 (libtpu's estimate, XLA attention,
    bf16 compute) measured faster (benchmarks/results/NOTES.md, session 11).
    """
    if kv_layout == "bksd":
        # keys first: with queries first, XLA's CPU backend copied a batch-1 key cache
        # twice per layer and step (it duplicated the cache write into the product's operand)
        scores = jnp.einsum("bksd,bqkgd->bkgqs", k, q, preferred_element_type=scores_dtype)
    else:
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=scores_dtype)
    scores = scores * jnp.asarray(q.shape[-1] ** -0.5, scores_dtype)
    scores = jnp.where(mask, scores, jnp.finfo(scores_dtype).min)
    # Every query sees at least its own key, so each row's sum is at least exp(0) = 1.
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - top).astype(v.dtype)
    total = jnp.sum(weights, axis=-1, dtype=jnp.float32)  # [b, kv, group, q]
    out = jnp.einsum(f"bkgqs,{kv_layout}->bqkgd", weights, v, preferred_element_type=jnp.float32)
    return (out / jnp.moveaxis(total, -1, 1)[..., None]).astype(v.dtype)


# On TPU causal XLA attention runs in 8 query blocks (36/64 of the square) instead of 4 (10/16):
# fewer bytes moved by the 7B layer on v5p (benchmarks/results/NOTES.md). On CPU 4 was
# measured best.
TPU_MAX_QUERY_BLOCKS = 8


def query_blocks(length: int, min_block: int = 128, max_blocks: int = 4) -> int:
    """How many query blocks causal attention is cut into (1 for short rows)."""
    blocks = min(max_blocks, length // min_block)
    while blocks > 1 and length % blocks:
        blocks -= 1
    return max(blocks, 1)


def xla_attention(q, k, v, segment_ids, blocks: int | None = None, float32_scores: bool = True):
    """Causal attention in plain XLA ops; GQA by grouping query heads, never repeating k, v.

    Queries are cut into `blocks` static blocks, each attending only to the keys up to its
    own end, so most of the masked upper triangle is never computed: with 4 blocks, scores,
    softmax and both matmuls cover 62.5% of the square (measured faster on CPU, see
    benchmarks/results/NOTES.md). `float32_scores=False` computes the scores and softmax in
    q's dtype (MaxText's default for its dot_product attention): faster, less exact.
    """
    batch, length, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    scores_dtype = jnp.float32 if float32_scores else q.dtype
    blocks = query_blocks(length) if blocks is None else blocks
    if length % blocks:
        raise ValueError(f"sequence length {length} does not split into {blocks} query blocks")
    size = length // blocks
    q = q.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
    outs = []
    for i in range(blocks):
        end = (i + 1) * size
        mask = _block_mask(i * size, size, end, segment_ids)
        outs.append(_attend(q[:, i * size : end], k[:, :end], v[:, :end], mask, scores_dtype))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(batch, length, n_heads, head_dim)


def cached_attention(q, k_cache, v_cache, positions):
    """Grouped-query attention of q [b, l, heads, d] over a KV cache [b, kv_heads, slots, d]
    whose slot s holds the token at position s (jaxlm.generate): a query at position p sees
    slots 0..p. Slots past p (padding, or not yet written) are never read, so one mask
    serves the prefill of right-padded prompts and every decode step.

    Slots come after kv heads so that both products take each (row, kv head)'s [slots, d]
    block as it lies: with slots first, XLA's CPU backend copied every layer's cache into
    that order at every decode step (benchmarks/results/NOTES.md)."""
    batch, length, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    q = q.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
    visible = jnp.arange(k_cache.shape[2])[None, None, :] <= positions[:, :, None]  # [b, l, s]
    out = _attend(q, k_cache, v_cache, visible[:, None, None], kv_layout="bksd")
    return out.reshape(batch, length, n_heads, head_dim)
