"""Causal grouped-query attention behind one function, with segment masking for packed rows.

Shapes: q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim];
segment_ids [batch, length] (0 = padding) or None for one document per row. A query
attends to keys at or before its position inside the same segment.

Implementations: `xla` (plain ops, any platform), `cudnn` (GPU), `splash` (the Pallas TPU
kernel; on other platforms it runs in Pallas' interpret mode, slowly but exactly).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxlm import sharding as sharding_lib

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")


def _block_mask(q_start: int, q_len: int, k_len: int, segment_ids) -> jax.Array:
    """[batch or 1, 1, 1, q_len, k_len] boolean: may query q_start + i see key j (causal,
    and in the same segment when segment ids are given)?"""
    q_pos = jnp.arange(q_start, q_start + q_len)[:, None]
    mask = (jnp.arange(k_len)[None, :] <= q_pos)[None, None, None]
    if segment_ids is None:
        return mask
    q_seg = segment_ids[:, q_start:q_start + q_len]
    return mask & (q_seg[:, None, None, :, None] == segment_ids[:, None, None, None, :k_len])


def _attend(q, k, v, mask, scores_dtype=jnp.float32, kv_layout: str = "bskd"):
    """Softmax attention of grouped queries q [b, q, kv, group, d] over k, v laid out as
    `kv_layout` says: [b, s, kv, d] ("bskd") or, a decode cache's, [b, kv, s, d] ("bksd").

    Scores, max and exp in `scores_dtype` (float32 unless a config asks for the compute
    dtype). The softmax is normalised after the PV product, on the [q, d] output, instead of
    on the [q, k] probabilities, and by the sum of the weights as PV uses them (rounded to
    v's dtype), so they sum to exactly 1: fewer and narrower passes over the score-sized
    arrays, forward and backward. The 7B step on v5p-64 (libtpu's estimate, XLA attention,
    bf16 compute) went 6.207 -> 5.871 s (benchmarks/results/NOTES.md, session 11).
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
    out = jnp.einsum(f"bkgqs,{kv_layout}->bqkgd", weights, v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.moveaxis(total, -1, 1)[..., None]).astype(v.dtype)


# On TPU causal XLA attention runs in 8 query blocks (36/64 of the square) instead of 4 (10/16):
# the 7B layer's attention forward, remat forward and backward for 8 x 4096 tokens per v5p
# chip, compiled by libtpu: 121.8 GB moved with 8 blocks, 128.7 with 4, 126.1 with 16; est.
# 51.8, 54.8, 53.6 ms (benchmarks/results/NOTES.md). On CPU 4 was measured best.
TPU_MAX_QUERY_BLOCKS = 8


def query_blocks(length: int, min_block: int = 128, max_blocks: int = 4) -> int:
    """How many query blocks causal attention is cut into (1 for short rows)."""
    blocks = min(max_blocks, length // min_block)
    while blocks > 1 and length % blocks:
        blocks -= 1
    return max(blocks, 1)


def xla_attention(q, k, v, segment_ids, blocks: int | None = None,
                  float32_scores: bool = True):
    """Causal attention in plain XLA ops; GQA by grouping query heads, never repeating k, v.

    Queries are cut into `blocks` static blocks, each attending only to the keys up to its
    own end, so most of the masked upper triangle is never computed: with 4 blocks, scores,
    softmax and both matmuls cover 62.5% of the square (measured on a 2-core EPYC, medium
    vs_peers shape, alternating processes: 8-15% off the whole train step, see
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
        outs.append(_attend(q[:, i * size:end], k[:, :end], v[:, :end], mask, scores_dtype))
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


def splash_block_sizes(length: int, block_q: int, block_kv: int) -> splash.BlockSizes:
    """The kernel's tiles, forward and backward, clipped to the row length."""
    bq, bkv = min(block_q, length), min(block_kv, length)
    if length % bq or length % bkv or bkv % 128:
        raise ValueError(f"splash attention needs blocks that divide the row length {length} "
                         f"and key blocks a multiple of 128; got block_q={bq}, block_kv={bkv} "
                         "(set model.splash_block_q / model.splash_block_kv)")
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)


def _splash_kernel(heads: int, length: int, blocks: splash.BlockSizes, head_shards: int,
                   interpret: bool):
    """The causal splash kernel for [heads, length, head_dim] inputs. Built at each trace
    (its block tables become arrays of that trace; jax caches the host-side mask work)."""
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=head_shards,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids, block_q: int = 512, block_kv: int = 512,
                     interpret: bool | None = None):
    """Causal GQA attention with the Pallas splash kernel (jax.experimental.pallas.ops.tpu).

    k and v keep their kv heads (the kernel maps query head h to kv head h // group, as
    `xla_attention` groups them); the softmax scale is applied to q. Traced under a mesh
    (`jax.set_mesh`), the kernel runs in one `jax.shard_map`: rows split as the logical
    axis "batch" says, heads as "act_heads", each device running the kernel on its share.
    `interpret` (default: not on a TPU backend) runs the kernel in Pallas' interpreter.
    """
    batch, length, n_heads, head_dim = q.shape
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    blocks = splash_block_sizes(length, block_q, block_kv)
    q = jnp.swapaxes(q * jnp.asarray(head_dim ** -0.5, q.dtype), 1, 2)  # [b, h, l, d]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)

    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(("batch", "act_heads", "length", None))
    rows, heads = (spec[0], spec[1]) if not mesh.empty else (None, None)
    if not mesh.empty and sharding_lib.axes_size(mesh, spec[2]) > 1:
        raise ValueError("splash_attention takes whole rows: the logical axis 'length' maps "
                         f"to mesh axes {spec[2]}; a split sequence goes through "
                         "jaxlm.context_parallel.attention")
    head_shards = sharding_lib.axes_size(mesh, heads) if heads else 1
    kernel = _splash_kernel(n_heads, length, blocks, head_shards, bool(interpret))

    def per_shard(kernel, q, k, v, segment_ids):
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(kernel)(q, k, v, ids)

    if mesh.empty:
        out = per_shard(kernel, q, k, v, segment_ids)
    else:
        kernel_spec = kernel.manual_sharding_spec(
            jax.sharding.NamedSharding(mesh, P(heads, None)))
        out = jax.shard_map(
            per_shard, mesh=mesh, check_vma=False,
            in_specs=(kernel_spec, P(rows, heads), P(rows, heads), P(rows, heads), P(rows)),
            out_specs=P(rows, heads))(kernel, q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)


def resolve(impl: str, platform: str, dtype) -> str:
    """`auto` made concrete for a platform: splash on TPU, cuDNN on GPU in 16-bit, else xla."""
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(q, k, v, segment_ids, impl: str = "xla", *, splash_block_q: int = 512,
              splash_block_kv: int = 512, splash_interpret: bool | None = None,
              max_query_blocks: int | None = None, float32_scores: bool = True):
    """Dispatch to an implementation: `xla`, `cudnn`, `splash`, or `auto` (see `resolve`,
    judged by the default backend). `max_query_blocks` caps `xla`'s causal query blocks
    (default: `query_blocks`' own); `float32_scores` is `xla_attention`'s."""
    impl = resolve(impl, jax.default_backend(), q.dtype)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "xla":
        blocks = None if max_query_blocks is None else query_blocks(
            q.shape[1], max_blocks=max_query_blocks)
        return xla_attention(q, k, v, segment_ids, blocks, float32_scores)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, splash_block_q, splash_block_kv,
                                splash_interpret)
    raise ValueError(f"unknown attention implementation {impl!r}; use one of {IMPLEMENTATIONS}")


def cached_attention(q, k_cache, v_cache, positions):
    """Grouped-query attention of q [b, l, heads, d] over a KV cache [b, kv_heads, slots, d]
    whose slot s holds the token at position s (jaxlm.generate): a query at position p sees
    slots 0..p. Slots past p (padding, or not yet written) are never read, so one mask
    serves the prefill of right-padded prompts and every decode step.

    Slots come after kv heads so that both products take each (row, kv head)'s [slots, d]
    block as it lies: with slots first, XLA's CPU backend copied every layer's cache into
    that order at every decode step (8 rows, 256 slots: 16 of a ~50 ms step)."""
    batch, length, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    q = q.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
    visible = jnp.arange(k_cache.shape[2])[None, None, :] <= positions[:, :, None]  # [b, l, s]
    out = _attend(q, k_cache, v_cache, visible[:, None, None], kv_layout="bksd")
    return out.reshape(batch, length, n_heads, head_dim)
