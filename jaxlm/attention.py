"""Causal grouped-query attention behind one function, with segment masking for packed rows.

Shapes: q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim];
segment_ids [batch, length] (0 = padding) or None for one document per row. A query
attends to keys at or before its position inside the same segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _block_mask(q_start: int, q_len: int, k_len: int, segment_ids) -> jax.Array:
    """[batch or 1, 1, 1, q_len, k_len] boolean: may query q_start + i see key j (causal,
    and in the same segment when segment ids are given)?"""
    q_pos = jnp.arange(q_start, q_start + q_len)[:, None]
    mask = (jnp.arange(k_len)[None, :] <= q_pos)[None, None, None]
    if segment_ids is None:
        return mask
    q_seg = segment_ids[:, q_start:q_start + q_len]
    return mask & (q_seg[:, None, None, :, None] == segment_ids[:, None, None, None, :k_len])


def _attend(q, k, v, mask):
    """Softmax attention of grouped queries q [b, q, kv, group, d] over k, v [b, k, kv, d]."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)


def query_blocks(length: int, min_block: int = 128, max_blocks: int = 4) -> int:
    """How many query blocks causal attention is cut into (1 for short rows)."""
    blocks = min(max_blocks, length // min_block)
    while blocks > 1 and length % blocks:
        blocks -= 1
    return max(blocks, 1)


def xla_attention(q, k, v, segment_ids, blocks: int | None = None):
    """Causal attention in plain XLA ops; GQA by grouping query heads, never repeating k, v.

    Queries are cut into `blocks` static blocks, each attending only to the keys up to its
    own end, so most of the masked upper triangle is never computed: with 4 blocks, scores,
    softmax and both matmuls cover 62.5% of the square (measured on a 2-core EPYC, medium
    vs_peers shape, alternating processes: 8-15% off the whole train step, see
    benchmarks/results/NOTES.md).
    """
    batch, length, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    blocks = query_blocks(length) if blocks is None else blocks
    if length % blocks:
        raise ValueError(f"sequence length {length} does not split into {blocks} query blocks")
    size = length // blocks
    q = q.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
    outs = []
    for i in range(blocks):
        end = (i + 1) * size
        mask = _block_mask(i * size, size, end, segment_ids)
        outs.append(_attend(q[:, i * size:end], k[:, :end], v[:, :end], mask))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(batch, length, n_heads, head_dim)


def cudnn_attention(q, k, v, segment_ids):
    """cuDNN fused attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).

    Unpacked rows (segment_ids None) use cuDNN's own causal mask; packed rows add the
    same-segment mask as a dense [batch, 1, q, k] input, which costs memory at long lengths.
    """
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation="cudnn")


def attention(q, k, v, segment_ids, impl: str = "xla"):
    """Dispatch to an implementation: `xla`, `cudnn`, or `auto` (cuDNN where it applies)."""
    if impl == "auto":
        on_gpu = jax.devices()[0].platform == "gpu"
        impl = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids)
    raise ValueError(f"unknown attention implementation {impl!r}; use 'xla', 'cudnn' or 'auto'")
