"""Causal grouped-query attention behind one function, with segment masking for packed rows.

Shapes: q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim];
segment_ids [batch, length] (0 = padding) or None for one document per row. A query
attends to keys at or before its position inside the same segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_segment_mask(length: int, segment_ids: jax.Array | None) -> jax.Array:
    """[batch or 1, 1, q_len, k_len] boolean: causal, and same-segment when segments are given."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if segment_ids is None:
        return causal
    return causal & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def xla_attention(q, k, v, segment_ids):
    """Plain einsum attention; GQA by grouping query heads, never repeating k and v."""
    batch, length, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    q = q.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    mask = causal_segment_mask(length, segment_ids)[:, :, None]  # [b, 1, 1, q, s]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
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
