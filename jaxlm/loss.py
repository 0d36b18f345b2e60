"""Next-token cross-entropy straight from the final hidden states, a slice of tokens at a time.

Whole float32 logits are batch x length x vocab: 5 GiB for 20 rows of 2048 tokens and a
32k vocabulary, 20 GiB at 128k, and their gradient as much again. `cross_entropy_sum` runs
the LM head, the softmax and both gradient matmuls over `chunks` slices of every row in a
loop, so only one slice's logits exist at a time. A slice takes every chunks-th position
(strided), so a sequence-sharded row keeps each slice spread over all its devices.

The loss is a sum, so its cotangent only scales the gradients: they are computed in the
forward pass, while the slice's logits are at hand, and nothing of size vocab is kept for
the backward pass.

Vocab-parallel: traced under a mesh (`jax.set_mesh`) whose axes for the logical "act_vocab"
have more than one device (mesh.tensor > 1), the loss runs in one `jax.shard_map`: each
device applies its vocab shard of the head to its rows, the softmax's max and sum of
exponentials are combined over the shards (`pmax`, `psum`), and the target logit comes from
the shard that holds it. Whole logits never exist on any device, with any `chunks`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlm import mesh_axes


def token_cross_entropy(logits, targets):
    """-log softmax(logits)[targets] per position, float32 logits [..., vocab], int targets [...].

    The same float32 arithmetic as optax.softmax_cross_entropy_with_integer_labels (shift by the
    row max, log-sum-exp, minus the target's shifted logit), but the target's logit is picked by
    comparing the vocabulary index with the target (a select summed over the row, exact: one
    term is not zero) instead of a gather, whose gradient is a scatter into a zeroed
    logits-sized buffer. On the TPU compiler (LLaMA-2-7B head, 8 x 4096 tokens per v5p chip,
    value and gradient of both: benchmarks/results/NOTES.md) the select form moves 18.4 GB
    against the gather's 26.9 GB, est. 0.067 vs 0.071 s. On a 2-core CPU it is the slower
    one ([8, 512, 32000] logits, value and gradient: 1.3-1.5 s against 0.7-1.0 s), so
    jaxlm.step uses it for TPU only. Values and gradients are bit-identical to optax's.
    """
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = logits - top
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], shifted, 0.0), axis=-1)
    return jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - target_logit


@jax.custom_vjp
def logits_dot(x, head):
    """x [b, l, d] @ head [d, v] -> float32 logits, with the backward in x's dtype.

    The forward accumulates and returns float32. Plain autodiff would then carry the float32
    cotangent into both backward matmuls, running them as float32 GEMMs (measured slower on
    an H100, benchmarks/results/NOTES.md); casting the cotangent to the compute dtype first
    runs them as bf16 GEMMs, as the rest of the model's backward already does.
    """
    return jnp.einsum("bld,dv->blv", x, head, preferred_element_type=jnp.float32)


def _logits_dot_fwd(x, head):
    return logits_dot(x, head), (x, head)


def _logits_dot_bwd(residuals, grad):
    x, head = residuals
    grad = grad.astype(x.dtype)
    grad_x = jnp.einsum("blv,dv->bld", grad, head)
    grad_head = jnp.einsum("bld,blv->dv", x, grad, preferred_element_type=jnp.float32)
    return grad_x, grad_head.astype(head.dtype)


logits_dot.defvjp(_logits_dot_fwd, _logits_dot_bwd)


def _slices(a, chunks: int):
    """[b, l, ...] -> [chunks, b, l / chunks, ...], slice j holding positions j, j + chunks, ..."""
    b, l = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, l // chunks, chunks, *a.shape[2:]), 2, 0)


def _unslice(a):
    """Inverse of _slices."""
    chunks, b, per = a.shape[:3]
    return jnp.moveaxis(a, 0, 2).reshape(b, per * chunks, *a.shape[3:])


def _psum(a, axes: tuple):
    return lax.psum(a, axes) if axes else a


def _target_logit(logits, targets, vocab: tuple):
    """logits[..., target]; over a split vocabulary (targets already shard-local) the shard
    that holds the target gives it, the others 0."""
    if not vocab:
        return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    shard = logits.shape[-1]
    held = (targets >= 0) & (targets < shard)
    picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, shard - 1)[..., None], axis=-1)
    return lax.psum(jnp.where(held, picked[..., 0], 0.0), vocab)


def _slice_loss(x, head, targets, weights, with_grads: bool, vocab: tuple = ()):
    """Weighted cross-entropy sum of one slice [b, t, d]; with its gradients if asked.

    With `vocab` (mesh axes, inside shard_map) `head` is this device's shard of the
    vocabulary: the softmax's max and normaliser are combined over the shards, and grad_x is
    this shard's share of the sum (the caller adds the shares up once, after all slices).
    """
    logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
    shard = head.shape[-1]
    if vocab:
        targets = targets - lax.axis_index(vocab) * shard  # index into this shard
    else:
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    top = jnp.max(logits, axis=-1, keepdims=True)
    if vocab:
        top = lax.pmax(top, vocab)
    exp = jnp.exp(logits - top)
    total = _psum(jnp.sum(exp, axis=-1), vocab)
    log_norm = top[..., 0] + jnp.log(total)
    loss = jnp.sum((log_norm - _target_logit(logits, targets, vocab)) * weights)
    if not with_grads:
        return loss, None, None
    probs = exp / total[..., None]
    one_hot = jax.nn.one_hot(targets, shard, dtype=jnp.float32)  # all zero where not held
    # Both matmuls take inputs in the compute dtype, as `logits_dot`'s backward
    # runs them, and give float32: the backward scales and rounds them once.
    grad_logits = ((probs - one_hot) * weights[..., None]).astype(x.dtype)
    grad_x = jnp.einsum("btv,dv->btd", grad_logits, head, preferred_element_type=jnp.float32)
    grad_head = jnp.einsum("btd,btv->dv", x, grad_logits, preferred_element_type=jnp.float32)
    return loss, grad_x, grad_head


def _scan(x, head, targets, weights, chunks: int, with_grads: bool, vocab: tuple = ()):
    if chunks == 1:  # no loop: jaxlm.aot counts the FLOPs of loop-free programs
        return _slice_loss(x, head, targets, weights, with_grads, vocab)

    def body(carry, xs):
        loss, grad_head = carry
        x_slice, target_slice, weight_slice = xs
        slice_loss, grad_x, slice_grad_head = _slice_loss(
            x_slice, head, target_slice, weight_slice, with_grads, vocab
        )
        if with_grads:
            grad_head = grad_head + slice_grad_head
        return (loss + slice_loss, grad_head), grad_x

    grad_head = jnp.zeros(head.shape, jnp.float32) if with_grads else None
    xs = (_slices(x, chunks), _slices(targets, chunks), _slices(weights, chunks))
    (loss, grad_head), grad_x = jax.lax.scan(body, (jnp.zeros((), jnp.float32), grad_head), xs)
    return loss, (_unslice(grad_x) if with_grads else None), grad_head


def vocab_axes() -> tuple:
    """The mesh axes (of more than one device) that split the logits' vocabulary under the
    current mesh and logical rules; () when it is not split and the loss runs unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = mesh_axes.spec_axes(nn.logical_to_mesh_axes(("act_vocab",))[0])
    return tuple(a for a in axes if mesh.shape[a] > 1)


def _vocab_parallel(x, head, targets, weights, chunks: int, with_grads: bool, vocab: tuple):
    """`_scan` in a shard_map: rows split as "batch" / "length" say, the head's vocabulary
    over `vocab` (its embed dim gathered, as FSDP gathers weights before use).

    Not differentiated (the custom VJP is outside), so the collectives are written out and
    check_vma is off. grad_x is summed over the vocab shards; grad_head over the rows, and
    where the embed dim is split over row axes (fsdp) reduce-scattered to that split.
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch, length = nn.logical_to_mesh_axes(("batch", "length"))
    rows = tuple(
        a for a in mesh_axes.spec_axes(batch) + mesh_axes.spec_axes(length) if mesh.shape[a] > 1
    )
    embed = nn.logical_to_mesh_axes(("embed",))[0]  # alone: one call gives each axis out once
    scatter = tuple(a for a in mesh_axes.spec_axes(embed) if a in rows)
    if head.shape[0] % mesh_axes.axes_size(mesh, scatter):
        scatter = ()
    summed = tuple(a for a in rows if a not in scatter)

    def per_shard(x, head, targets, weights):
        loss, grad_x, grad_head = _scan(x, head, targets, weights, chunks, with_grads, vocab)
        loss = _psum(loss, rows)
        if not with_grads:
            return loss
        grad_head = _psum(grad_head, summed)
        if scatter:
            grad_head = lax.psum_scatter(grad_head, scatter, scatter_dimension=0, tiled=True)
        return loss, _psum(grad_x, vocab), grad_head

    row_spec = P(batch, length)
    out_specs = (P(), row_spec, P(scatter or None, vocab)) if with_grads else P()
    out = jax.shard_map(
        per_shard,
        mesh=mesh,
        check_vma=False,
        in_specs=(row_spec, P(None, vocab), row_spec, row_spec),
        out_specs=out_specs,
    )(x, head, targets, weights)
    return out if with_grads else (out, None, None)


def _loss_and_grads(x, head, targets, weights, chunks: int, with_grads: bool):
    vocab = vocab_axes()
    split = 1  # devices along the sequence, when the shard_map sees only its part of a row
    if vocab:
        mesh = jax.sharding.get_abstract_mesh()
        split = mesh_axes.axes_size(mesh, nn.logical_to_mesh_axes(("length",))[0])
    if x.shape[1] % (split * chunks):
        raise ValueError(
            f"sequence length {x.shape[1]} ({x.shape[1] // split} positions on each "
            f"of {split} devices along it) does not split into {chunks} loss chunks; "
            "set train.loss_chunks to a divisor of data.seq_len / mesh.sequence"
        )
    if vocab:
        return _vocab_parallel(x, head, targets, weights, chunks, with_grads, vocab)
    return _scan(x, head, targets, weights, chunks, with_grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cross_entropy_sum(x, head, targets, weights, chunks: int):
    """sum(weights * -log softmax(x @ head)[targets]) in float32, `chunks` slices at a time.

    x [b, l, d] final hidden states; head [d, vocab]; targets [b, l] int; weights [b, l]
    float (0 drops a position). l (each device's part of it) must be divisible by chunks.
    Vocab-parallel when `vocab_axes()` is not empty (see the module docstring).
    """
    return _loss_and_grads(x, head, targets, weights, chunks, with_grads=False)[0]


def _forward(x, head, targets, weights, chunks):
    """The gradients stay float32 until the backward scales them by the cotangent, so a bfloat16
    model's gradients are rounded once, as whole logits' are (b*l*d + d*vocab float32 residuals,
    each split as x and the head are)."""
    loss, grad_x, grad_head = _loss_and_grads(x, head, targets, weights, chunks, with_grads=True)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), head.dtype))  # residuals must be arrays
    return loss, (grad_x, grad_head, dtypes)


def _backward(chunks, residuals, g):
    grad_x, grad_head, (x_like, head_like) = residuals
    return (g * grad_x).astype(x_like.dtype), (g * grad_head).astype(head_like.dtype), None, None


cross_entropy_sum.defvjp(_forward, _backward)
