"""cuDNN's fused attention (GPU, 16-bit) through `jax.nn.dot_product_attention`."""

from __future__ import annotations

import jax


def cudnn_attention(q, k, v, segment_ids):
    """Causal GQA attention in cuDNN's kernel (GPU, bf16/fp16).

    Unpacked rows (segment_ids None) use cuDNN's own causal mask; packed rows add the
    same-segment mask as a dense [batch, 1, q, k] input, which costs memory at long lengths.
    """
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
