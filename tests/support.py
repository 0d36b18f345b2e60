"""Small configs, states and batches shared by the tests."""

import struct

import jax.numpy as jnp
import numpy as np

from configs import tiny
from jaxlm import step as step_lib
from jaxlm.data.pipeline import PackedRows


def small_config(**mesh):
    """A 2-layer model small enough to compile in seconds; mesh sizes as given."""
    config = tiny.get_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 256, 64, 2, 4, 2, 128
    config.data.seq_len = 32
    config.train.global_batch_size = 16
    config.train.warmup_steps = 0  # the first update already moves the weights
    config.train.steps = 10
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh})
    return config


def short_run_config(tokenizer_path, steps, **train):
    """A run of `steps` updates of a 2-layer model on the test corpus, seconds a step; logs
    every step unless `train` says otherwise."""
    config = tiny.get_config()
    config.model.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
    config.data.update(dict(tokenizer=tokenizer_path, seq_len=64, eval_batches=1))
    config.train.update(dict(steps=steps, global_batch_size=8, warmup_steps=0, log_every=1))
    config.train.update(train)
    return config


def factory_for(config, devices=None):
    return step_lib.build(config, devices)[0]


def packed_batch(config, n_rows, seed=0, doc_lengths=(5, 40)):
    """Rows packed from random documents (several per row, with boundaries)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < (n_rows + 1) * config.data.seq_len:
        docs.append(rng.integers(4, config.model.vocab_size, size=rng.integers(*doc_lengths)))
        total += len(docs[-1])
    rows = PackedRows(docs, config.data.seq_len, seed=seed)
    return {k: np.stack([rows[i][k] for i in range(n_rows)]) for k in rows[0]}


def one_document_batch(config, n_rows, seed=0):
    """Rows cut from one long document: every target is real (no masking)."""
    rng = np.random.default_rng(seed)
    doc = rng.integers(4, config.model.vocab_size, size=(n_rows + 1) * config.data.seq_len + 1)
    rows = PackedRows([doc], config.data.seq_len, seed=seed)
    batch = {k: np.stack([rows[i][k] for i in range(n_rows)]) for k in rows[0]}
    assert batch["loss_mask"].all()
    return batch


def assert_directional_derivatives(
    objective, inputs, grads, rng, tries: int, tol: float, step: float = 1e-5
):
    """`grads` (of `objective` at `inputs`) agree with central differences of the float64
    `objective` along `tries` random directions of all inputs together."""
    for _ in range(tries):
        direction = [rng.standard_normal(a.shape) for a in inputs]
        plus = objective(*(a + step * d for a, d in zip(inputs, direction)))
        minus = objective(*(a - step * d for a, d in zip(inputs, direction)))
        expected = (plus - minus) / (2 * step)
        got = sum(np.sum(np.asarray(g, np.float64) * d) for g, d in zip(grads, direction))
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


def float32_roundoff(values, n_terms: int) -> float:
    """How far two float32 programs that compute `values` with their sums in different orders
    (a kernel against the XLA path) may differ from round-off alone: a float32 sum of n terms
    is off by about eps * sqrt(n) times the size of its terms (round-off errors add like a
    random walk: Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 2.8),
    with the largest of `values` standing for that size. A real error (a mask, a scale, a
    block out of place) is orders of magnitude above it."""
    return float(np.finfo(np.float32).eps * np.sqrt(n_terms) * np.max(np.abs(values)))


def bfloat16_roundoff(values, n_terms: int) -> float:
    """float32_roundoff for a program that rounds what it sums to bfloat16 (eps 2^-7)."""
    values = np.asarray(values, np.float32)
    return float(jnp.finfo(jnp.bfloat16).eps * np.sqrt(n_terms) * np.max(np.abs(values)))


def assert_greedy(tokens, logits, n_terms: int):
    """Each of `tokens` is the argmax of its row of `logits` (float32, computed another way),
    or ties it within float32_roundoff: on a near-tie either pick is right, and another CPU's
    summation order may take the other. A wrong pick is off by the logits' spread."""
    logits = np.asarray(logits)
    chosen = logits[np.arange(len(tokens)), np.asarray(tokens)]
    bound = float32_roundoff(logits, n_terms)
    np.testing.assert_allclose(chosen, logits.max(-1), rtol=0, atol=bound)


def logit_terms(config) -> int:
    """The terms behind one logit (for float32_roundoff): attention sums over up to seq_len
    keys, then the head over d_model, as in test_splash's model test."""
    return config.data.seq_len * config.model.d_model


def loss_terms(config) -> int:
    """The terms a model's mean loss, or one gradient entry, sums over (for float32_roundoff):
    each token's logsumexp over the vocabulary, then the batch's tokens."""
    return config.train.global_batch_size * config.data.seq_len * config.model.vocab_size


def ref_attention(q, k, v, segments):
    """float64 NumPy: q [L, H, d], k/v [L, KV, d]; query head h reads kv head h // (H / KV);
    a query sees keys at or before it in the same segment."""
    length, heads, d = q.shape
    group = heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    allowed = np.tril(np.ones((length, length), bool)) & (segments[:, None] == segments[None, :])
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", weights, v)


def assert_attention_matches_reference(
    out, grads, q, k, v, segments, weights, tol: float, grad_tol: float
):
    """Batched attention `out` and the gradients of sum(out * weights) w.r.t. q, k, v equal
    ref_attention row by row, the gradients as directional derivatives (float64 inputs)."""
    for b in range(q.shape[0]):
        np.testing.assert_allclose(
            np.asarray(out[b], np.float64),
            ref_attention(q[b], k[b], v[b], segments[b]),
            atol=tol,
            rtol=tol,
        )

    def ref_objective(q, k, v):
        return sum(
            np.sum(ref_attention(q[b], k[b], v[b], segments[b]) * weights[b])
            for b in range(q.shape[0])
        )

    assert_directional_derivatives(
        ref_objective, (q, k, v), grads, np.random.default_rng(2), tries=2, tol=grad_tol
    )


def tensorboard_view(directory):
    """What TensorBoard shows of `directory`'s event files: (tag, step, value) in order.

    Files are read in name order, as TensorBoard does; a SessionLog START at step s (a writer's
    purge_step) hides the events earlier files logged at steps >= s, as TensorBoard does. A
    record cut short (a process killed while writing it) ends its file, as it does for
    TensorBoard.
    """
    from tensorboardX.proto import event_pb2

    files = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at, events = path.read_bytes(), 0, []
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            if at + 12 + length + 4 > len(data):
                break
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12 : at + 12 + length])
            events.append(event)
            at += 12 + length + 4
        if events:
            files.append(events)
    shown = []
    for events in files:
        for event in events:
            if (
                event.HasField("session_log")
                and event.session_log.status == event.session_log.START
            ):
                shown = [(tag, step, value) for tag, step, value in shown if step < event.step]
            for value in event.summary.value:
                shown.append((value.tag, event.step, value.simple_value))
    return shown
