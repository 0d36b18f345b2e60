"""Next-token cross-entropy straight from the final hidden states, a slice of tokens at a time.

Whole float32 logits are batch x length x vocab: 5 GiB for 20 rows of 2048 tokens and a
32k vocabulary, 20 GiB at 128k, and their gradient as much again. `cross_entropy_sum` runs
the LM head, the softmax and both gradient matmuls over `chunks` slices of every row in a
loop, so only one slice's logits exist at a time. A slice takes every chunks-th position
(strided), so a sequence-sharded row keeps each slice spread over all its devices.

The loss is a sum, so its cotangent only scales the gradients: they are computed in the
forward pass, while the slice's logits are at hand, and nothing of size vocab is kept for
the backward pass.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def _slices(a, chunks: int):
    """[b, l, ...] -> [chunks, b, l / chunks, ...], slice j holding positions j, j + chunks, ..."""
    b, l = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, l // chunks, chunks, *a.shape[2:]), 2, 0)


def _unslice(a):
    """Inverse of _slices."""
    chunks, b, per = a.shape[:3]
    return jnp.moveaxis(a, 0, 2).reshape(b, per * chunks, *a.shape[3:])


def _slice_loss(x, head, targets, weights, with_grads: bool):
    """Weighted cross-entropy sum of one slice [b, t, d]; with its gradients if asked."""
    logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    top = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1)
    log_norm = top[..., 0] + jnp.log(total)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum((log_norm - target_logit) * weights)
    if not with_grads:
        return loss, None, None
    probs = exp / total[..., None]
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    # Both matmuls take inputs in the compute dtype, as jaxlm.model.logits_dot's backward
    # runs them, and give float32: the backward scales and rounds them once.
    grad_logits = ((probs - one_hot) * weights[..., None]).astype(x.dtype)
    grad_x = jnp.einsum("btv,dv->btd", grad_logits, head, preferred_element_type=jnp.float32)
    grad_head = jnp.einsum("btd,btv->dv", x, grad_logits, preferred_element_type=jnp.float32)
    return loss, grad_x, grad_head


def _scan(x, head, targets, weights, chunks: int, with_grads: bool):
    if x.shape[1] % chunks:
        raise ValueError(f"sequence length {x.shape[1]} does not split into {chunks} loss chunks; "
                         "set train.loss_chunks to a divisor of data.seq_len")

    def body(carry, xs):
        loss, grad_head = carry
        x_slice, target_slice, weight_slice = xs
        slice_loss, grad_x, slice_grad_head = _slice_loss(x_slice, head, target_slice,
                                                          weight_slice, with_grads)
        if with_grads:
            grad_head = grad_head + slice_grad_head
        return (loss + slice_loss, grad_head), grad_x

    grad_head = jnp.zeros(head.shape, jnp.float32) if with_grads else None
    xs = (_slices(x, chunks), _slices(targets, chunks), _slices(weights, chunks))
    (loss, grad_head), grad_x = jax.lax.scan(body, (jnp.zeros((), jnp.float32), grad_head), xs)
    return loss, (_unslice(grad_x) if with_grads else None), grad_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cross_entropy_sum(x, head, targets, weights, chunks: int):
    """sum(weights * -log softmax(x @ head)[targets]) in float32, `chunks` slices at a time.

    x [b, l, d] final hidden states; head [d, vocab]; targets [b, l] int; weights [b, l]
    float (0 drops a position). l must be divisible by chunks.
    """
    return _scan(x, head, targets, weights, chunks, with_grads=False)[0]


def _forward(x, head, targets, weights, chunks):
    """The gradients stay float32 until the backward scales them by the cotangent, so a bfloat16
    model's gradients are rounded once, as whole logits' are (b*l*d + d*vocab float32 residuals)."""
    loss, grad_x, grad_head = _scan(x, head, targets, weights, chunks, with_grads=True)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), head.dtype))  # residuals must be arrays
    return loss, (grad_x, grad_head, dtypes)


def _backward(chunks, residuals, g):
    grad_x, grad_head, (x_like, head_like) = residuals
    return (g * grad_x).astype(x_like.dtype), (g * grad_head).astype(head_like.dtype), None, None


cross_entropy_sum.defvjp(_forward, _backward)
