"""The log-likelihood scorer behind jaxlm.eval (documents, choices) and jaxlm.harness (lm-eval).

A request asks for log P(continuation | context). Requests are sorted by length and batched,
a batch padded to one of four lengths per power of two (`score_length`), rows split over
every device (FSDP weights as in training, tensor parallel as the run trained).

Requests that share a context (a multiple-choice item's choices, the letters of an MMLU
question) compute it once, as prefix caching does in serving engines: a batch's distinct
contexts fill a KV cache in one call, the last context token's state scores every
continuation's first token, and the rest of each continuation runs against a copy of its
context's cache rows. Four choices of 60 context and 10 continuation tokens then cost the
model 100 token positions instead of 276. Requests with a context of their own (document
windows, Winogrande's two contexts) take one plain forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import generate as gen
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm.errors import EvalError

LOGITS_BUDGET = 1 << 27  # float32 logits held at once, per device (512 MiB)


@dataclasses.dataclass(frozen=True)
class Request:
    """Score `continuation` (token ids, at least one) after `context` (at least one)."""

    context: tuple
    continuation: tuple


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation's token log-probabilities
    greedy: bool  # every continuation token is the model's argmax (ties count)


def score_length(length: int, max_len: int) -> int:
    """The next multiple of a quarter of the power of two below `length` (16, 20, 24, 28, 32, 40,
    ...; at most max_len): under a fifth padding, for four compiled shapes per doubling."""
    quarter = (1 << ((max(length, gen.MIN_BUCKET) - 1).bit_length() - 1)) // 4
    return min(max(gen.MIN_BUCKET, -(-length // quarter) * quarter), max_len)


def rows_per_batch(run: run_lib.Run, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the devices the rows are split over."""
    ways = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    return -(-batch_size // ways) * ways


# ---------------------------------------------------------------- the jitted programs


def _target_scores(hidden, head, targets, chunk: int):
    """Log-probability of each target [b, l] after hidden states [b, l, d] and whether it is
    the argmax, a `chunk` of positions at a time so whole float32 logits are never held."""
    b, length, d = hidden.shape

    def score(piece):
        h, t = piece
        logits = model_lib.logits_dot(h, head).astype(jnp.float32)  # [b, chunk, vocab]
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1), target >= jnp.max(logits, axis=-1)

    pieces = (
        hidden.reshape(b, length // chunk, chunk, d).swapaxes(0, 1),
        targets.reshape(b, length // chunk, chunk).swapaxes(0, 1),
    )
    logprob, greedy = jax.lax.map(score, pieces)
    return logprob.swapaxes(0, 1).reshape(b, length), greedy.swapaxes(0, 1).reshape(b, length)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _plain_scores(cfg: model_lib.ModelConfig, rules: tuple, chunk: int, params, inputs, targets):
    """Each target's log-probability and greedy flag [b, l], one forward pass over inputs."""
    with nn.logical_axis_rules(rules):
        hidden, head = model_lib.Transformer(cfg).apply(
            {"params": params}, inputs, head_inputs=True
        )
        return _target_scores(hidden, head, targets, chunk)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _shared_scores(cfg, rules, slots, chunk, params, contexts, lengths, owners, inputs, targets):
    """Continuations after shared contexts: contexts [g, l1] (right-padded to `lengths`) fill
    a cache; continuation row r (of context `owners[r]`) is scored on targets [r, 1 + l2],
    the first from its context's last state, the rest after inputs [r, l2] (the continuation
    but its last token) fed at the positions after the context."""
    with nn.logical_axis_rules(rules):
        model = model_lib.Transformer(cfg)
        g, l1 = contexts.shape
        (hidden, head), cache = model.apply(
            {"params": params},
            contexts,
            jnp.broadcast_to(jnp.arange(l1), contexts.shape),
            head_inputs=True,
            cache=gen.init_cache(cfg, g, slots),
        )
        last = hidden[jnp.arange(g), lengths - 1][owners][:, None]  # [r, 1, d]
        first = _target_scores(last, head, targets[:, :1], 1)
        if inputs.shape[1] == 0:  # every continuation is one token long
            return first
        mine = jax.tree.map(lambda c: jnp.take(c, owners, axis=1), cache)  # [layers, r, ...]
        positions = lengths[owners][:, None] + jnp.arange(inputs.shape[1])
        (hidden, _), _ = model.apply(
            {"params": params}, inputs, positions, head_inputs=True, cache=mine
        )
        rest = _target_scores(hidden, head, targets[:, 1:], chunk)
        return tuple(jnp.concatenate(pair, axis=1) for pair in zip(first, rest))


def _chunk(run: run_lib.Run, rows: int, length: int) -> int:
    """Positions per logits chunk: the largest divisor of `length` within LOGITS_BUDGET."""
    budget = LOGITS_BUDGET * run.mesh.devices.size // (rows * run.config.vocab_size)
    return max([c for c in range(1, length + 1) if length % c == 0 and c <= budget], default=1)


# ---------------------------------------------------------------- batches


def score(
    run: run_lib.Run, requests: Sequence[Request], batch_size: int = 16, progress=None
) -> list[Score]:
    """A Score for each request, in order. A request longer than the context keeps its last
    `max_len` inputs (the continuation's end), as the harness does. `progress(n)` is told
    after each batch how many requests it scored."""
    rows = rows_per_batch(run, batch_size)
    scored: list[Score | None] = [None] * len(requests)
    plain, shared = split_by_context(requests, run.max_len)
    plain.sort(key=lambda i: -_length(requests[i], run.max_len))
    for score_batch, order in ((_score_plain, plain), (_score_shared, shared)):
        for start in range(0, len(order), rows):
            batch = order[start : start + rows]
            score_batch(run, [requests[i] for i in batch], rows, scored, batch)
            if progress is not None:
                progress(len(batch))
    return scored


def split_by_context(requests: Sequence[Request], max_len: int) -> tuple[list, list]:
    """(plain, shared): indices of requests scored alone, and of those sharing their context
    with another, grouped by context, longest first. A request cut to fit the context
    (`max_len` inputs) loses the start of its context and is scored alone."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if not r.context or not r.continuation:
            raise EvalError(f"request {i} has an empty context or continuation")
        if len(r.context) + len(r.continuation) - 1 <= max_len:
            groups.setdefault(r.context, []).append(i)
    shared = [g for g in groups.values() if len(g) > 1]
    shared.sort(key=lambda g: -(len(requests[g[0]].context) + _longest(requests, g)))
    in_shared = {i for g in shared for i in g}
    return [i for i in range(len(requests)) if i not in in_shared], [i for g in shared for i in g]


def _longest(requests: Sequence[Request], members: list[int]) -> int:
    return max(len(requests[i].continuation) for i in members)


def _length(request: Request, max_len: int) -> int:
    return min(len(request.context) + len(request.continuation) - 1, max_len)


def _score_plain(run, batch: list[Request], rows: int, scored: list, where: list[int]) -> None:
    length = score_length(max(_length(r, run.max_len) for r in batch), run.max_len)
    inputs = np.zeros((rows, length), np.int32)
    targets = np.zeros((rows, length), np.int32)
    for row, r in enumerate(batch):
        tokens = (r.context + r.continuation)[-(run.max_len + 1) :]
        inputs[row, : len(tokens) - 1] = tokens[:-1]
        targets[row, : len(tokens) - 1] = tokens[1:]
    with jax.set_mesh(run.mesh):
        logprob, greedy = _plain_scores(
            run.config, tuple(run.rules), _chunk(run, rows, length), run.params, inputs, targets
        )
    logprob, greedy = np.asarray(logprob, np.float64), np.asarray(greedy)
    for row, (i, r) in enumerate(zip(where, batch)):
        end = _length(r, run.max_len)
        n = min(len(r.continuation), run.max_len)
        scored[i] = Score(
            float(logprob[row, end - n : end].sum()), bool(greedy[row, end - n : end].all())
        )


def _score_shared(run, batch: list[Request], rows: int, scored: list, where: list[int]) -> None:
    contexts = list(dict.fromkeys(r.context for r in batch))  # distinct, in order
    owner = {c: n for n, c in enumerate(contexts)}
    # Context rows: a power of two of the devices' multiple, so a task compiles few shapes.
    ways = rows_per_batch(run, 1)
    n_contexts = ways * (1 << (-(-len(contexts) // ways) - 1).bit_length())
    l1 = score_length(max(len(c) for c in contexts), run.max_len)
    longest = max(len(r.continuation) for r in batch) - 1
    l2 = score_length(longest, run.max_len) if longest else 0
    context_tokens = np.zeros((n_contexts, l1), np.int32)
    lengths = np.ones(n_contexts, np.int32)
    for n, c in enumerate(contexts):
        context_tokens[n, : len(c)], lengths[n] = c, len(c)
    owners = np.zeros(rows, np.int32)
    inputs = np.zeros((rows, l2), np.int32)
    targets = np.zeros((rows, 1 + l2), np.int32)
    for row, r in enumerate(batch):
        owners[row] = owner[r.context]
        inputs[row, : len(r.continuation) - 1] = r.continuation[:-1]
        targets[row, : len(r.continuation)] = r.continuation
    with jax.set_mesh(run.mesh):
        logprob, greedy = _shared_scores(
            run.config,
            tuple(run.rules),
            l1 + l2,
            _chunk(run, rows, l2) if l2 else 1,
            run.params,
            context_tokens,
            lengths,
            owners,
            inputs,
            targets,
        )
    logprob, greedy = np.asarray(logprob, np.float64), np.asarray(greedy)
    for row, (i, r) in enumerate(zip(where, batch)):
        n = len(r.continuation)
        scored[i] = Score(float(logprob[row, :n].sum()), bool(greedy[row, :n].all()))
