"""The Pallas splash kernel (jax.experimental.pallas.ops.tpu): whole rows, and per sequence
shard against gathered keys in the balanced order (context parallelism's all_gather).

Off TPU the kernel runs in Pallas' interpreter, slowly but exactly.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxlm import mesh_axes
from jaxlm.attention.balanced_order import original_index


def splash_block_sizes(length: int, block_q: int, block_kv: int) -> splash.BlockSizes:
    """The kernel's tiles, forward and backward, clipped to the row length."""
    bq, bkv = min(block_q, length), min(block_kv, length)
    if length % bq or length % bkv or bkv % 128:
        raise ValueError(
            f"splash attention needs blocks that divide the row length {length} "
            f"and key blocks a multiple of 128; got block_q={bq}, block_kv={bkv} "
            "(set model.splash_block_q / model.splash_block_kv)"
        )
    return splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )


def _splash_kernel(
    heads: int, length: int, blocks: splash.BlockSizes, head_shards: int, interpret: bool
):
    """The causal splash kernel for [heads, length, head_dim] inputs. Built at each trace
    (its block tables become arrays of that trace; jax caches the host-side mask work)."""
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=blocks, head_shards=head_shards, q_seq_shards=1, interpret=interpret
    )


def splash_attention(
    q, k, v, segment_ids, block_q: int = 512, block_kv: int = 512, interpret: bool | None = None
):
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
    q = jnp.swapaxes(q * jnp.asarray(head_dim**-0.5, q.dtype), 1, 2)  # [b, h, l, d]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)

    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(("batch", "act_heads", "length", None))
    rows, heads = (spec[0], spec[1]) if not mesh.empty else (None, None)
    if not mesh.empty and mesh_axes.axes_size(mesh, spec[2]) > 1:
        raise ValueError(
            "splash_attention takes whole rows: the logical axis 'length' maps "
            f"to mesh axes {spec[2]}; a split sequence goes through "
            "jaxlm.attention.attend"
        )
    head_shards = mesh_axes.axes_size(mesh, heads) if heads else 1
    kernel = _splash_kernel(n_heads, length, blocks, head_shards, bool(interpret))

    def per_shard(kernel, q, k, v, segment_ids):
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(kernel)(q, k, v, ids)

    if mesh.empty:
        out = per_shard(kernel, q, k, v, segment_ids)
    else:
        kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(heads, None)))
        out = jax.shard_map(
            per_shard,
            mesh=mesh,
            check_vma=False,
            in_specs=(kernel_spec, P(rows, heads), P(rows, heads), P(rows, heads), P(rows)),
            out_specs=P(rows, heads),
        )(kernel, q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)


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


def _balanced_kernel(length, shards, heads, head_shards, blocks, interpret):
    mask = splash.MultiHeadMask([_BalancedCausalMask(length, shards)] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=blocks, head_shards=head_shards, q_seq_shards=shards, interpret=interpret
    )


def _all_gather_per_shard(kernel, q, k, v, seg, axes):
    """Per shard, in splash's layout: q [b, h, 2c, d]; k, v [b, kv, 2c, d]; seg [b, 2c]."""
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
    k, v, k_seg = gather(k, axis=2), gather(v, axis=2), gather(seg, axis=1)
    ids = splash.SegmentIds(q=seg, kv=k_seg)
    return jax.vmap(kernel)(q, k, v, ids)


def all_gather_splash(q, k, v, segment_ids, axes, blocks: splash.BlockSizes, interpret: bool):
    """Each sequence shard's queries against every key, gathered, in the splash kernel with a
    mask in the balanced order. q [b, l, h, d], k, v [b, l, kv, d] in the balanced order,
    sharded over "batch", "length" and "act_heads" of the traced mesh; `axes` the mesh axes
    of "length" (one name, or a tuple of several)."""
    mesh = jax.sharding.get_abstract_mesh()
    rows, length_axes, heads = nn.logical_to_mesh_axes(("batch", "length", "act_heads"))
    shards = mesh_axes.axes_size(mesh, length_axes)
    kernel = _balanced_kernel(
        q.shape[1], shards, q.shape[2], mesh_axes.axes_size(mesh, heads), blocks, interpret
    )
    kernel_spec = kernel.manual_sharding_spec(
        jax.sharding.NamedSharding(mesh, P(heads, length_axes))
    )
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))  # [b, h, l, d]
    spec = P(rows, heads, length_axes)
    out = jax.shard_map(
        functools.partial(_all_gather_per_shard, axes=axes),
        mesh=mesh,
        check_vma=False,
        in_specs=(kernel_spec, spec, spec, spec, P(rows, length_axes)),
        out_specs=spec,
    )(kernel, q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)
