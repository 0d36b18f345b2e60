"""Text generation with a KV cache: a library API and `python -m jaxlm.generate`.

    python -m jaxlm.generate --from=runs/tiny --prompt="def main(" --max_new_tokens=64

Library: `generate(params, model_config, prompts_tokens, max_len=..., ...)` returns the new
tokens of each prompt; `stream(...)` yields them a step at a time.

How it runs. Prompts are right-padded to a bucket (a power of two, so a new prompt length
rarely compiles anything new) and the KV cache, [layers, batch, slots, kv_heads, head_dim],
has a fixed number of slots (bucket + max_new_tokens rounded up to 128, at most the context).
Slot s holds the token at position s of its row, so every row's positions start at 0 at its
first token whatever its length, and a query at position p attends to slots 0..p only:
padding slots past a prompt are overwritten by generated tokens before anything can see
them. One jitted prefill runs the whole prompt batch; then a jitted one-token decode step
runs in a Python loop, which hands each token to the host as it comes (streaming, and
stopping once every row has hit EOS); the next step is dispatched before the host reads the
current token, so the host's work overlaps the device's. Under a mesh the weights keep their
training shardings (fsdp, tensor) and the cache is split over kv heads (the tensor axis).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib

CACHE_ROUND = 128  # cache slots are a multiple of this (or the whole context)
MIN_BUCKET = 16  # the shortest prompt bucket


class GenerateError(ValueError):
    """A generation request that cannot work; the message says which input and why."""


def bucket_length(length: int, max_len: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), at most max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


def cache_slots(bucket: int, max_new_tokens: int, max_len: int) -> int:
    """Slots for a bucket's prompts and their new tokens; rounded so that nearby requests
    share one compiled decode step."""
    needed = -(-(bucket + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
    return max(bucket, min(needed, max_len))


def init_cache(cfg: model_lib.ModelConfig, batch: int, slots: int) -> dict:
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
    names = ("layers", "batch", None, "act_kv_heads", None)
    return {name: nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype), names)
            for name in ("k", "v")}


def sample(logits, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row of float logits [b, vocab]: argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and
    to the nucleus (top_p): the most likely tokens whose probabilities, summed in decreasing
    order, first reach top_p (the most likely token is always in it)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass before it < top_p
        rows = jnp.arange(logits.shape[0])[:, None]
        keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the compiled prefill and decode step depend on besides array shapes."""

    cfg: model_lib.ModelConfig
    rules: tuple
    temperature: float
    top_k: int
    top_p: float


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(static: _Static, slots: int, params, tokens, lengths, key):
    """The whole padded prompt batch in one call: (first new token [b], filled cache)."""
    with nn.logical_axis_rules(static.rules):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        (hidden, head), cache = model_lib.Transformer(static.cfg).apply(
            {"params": params}, tokens, positions, head_inputs=True,
            cache=init_cache(static.cfg, batch, slots))
        last = hidden[jnp.arange(batch), lengths - 1][:, None]  # each row's last real token
        logits = model_lib.logits_dot(last, head)[:, 0]
        return sample(logits, key, static.temperature, static.top_k, static.top_p), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(static: _Static, params, cache, tokens, positions, key):
    """One token per row: feed `tokens` [b] at `positions` [b], sample the next."""
    with nn.logical_axis_rules(static.rules):
        logits, cache = model_lib.Transformer(static.cfg).apply(
            {"params": params}, tokens[:, None], positions[:, None], cache=cache)
        return sample(logits[:, 0], key, static.temperature, static.top_k, static.top_p), cache


def _check(prompts, cfg, max_len, max_new_tokens, temperature, top_k, top_p):
    if not len(prompts):
        raise GenerateError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty: give at least one token")
        if len(p) >= max_len:
            raise GenerateError(f"prompt {i} has {len(p)} tokens; the model's context is "
                                f"{max_len} tokens, so a prompt may have at most {max_len - 1}")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerateError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
    if not 0 < top_p <= 1:
        raise GenerateError(f"top_p={top_p} is invalid: it must lie in (0, 1] (1: no nucleus "
                            "filtering)")
    if temperature < 0:
        raise GenerateError(f"temperature={temperature} is invalid: 0 (greedy) or more")
    if top_k < 0:
        raise GenerateError(f"top_k={top_k} is invalid: 0 (off) or more")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens} is invalid: at least 1")


def stream(params, config: model_lib.ModelConfig, prompts_tokens: Sequence[Sequence[int]], *,
           max_len: int, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, mesh=None,
           rules: Sequence = ()) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Generate for a batch of prompts, yielding after each step (tokens, emitted, done),
    NumPy [batch] each: row i's completion grows by tokens[i] where emitted[i]; done[i] once
    row i has produced eos_id (not emitted) or max_new_tokens tokens, or filled the context
    (`max_len`, the length the model was trained on). Runs under `mesh` (if given) with the
    logical axis `rules` the params were sharded by; see `generate` for the rest."""
    _check(prompts_tokens, config, max_len, max_new_tokens, temperature, top_k, top_p)
    static = _Static(config, tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules),
                     float(temperature), int(top_k), float(top_p))
    lengths = np.array([len(p) for p in prompts_tokens], np.int32)
    bucket = bucket_length(int(lengths.max()), max_len)
    slots = cache_slots(bucket, max_new_tokens, max_len)
    budget = np.minimum(max_new_tokens, max_len - lengths)  # new tokens each row may have
    tokens = np.zeros((len(lengths), bucket), np.int32)
    for i, p in enumerate(prompts_tokens):
        tokens[i, :len(p)] = p
    key = jax.random.key(seed)

    with jax.set_mesh(mesh) if mesh is not None else _nothing():
        pending, cache = _prefill(static, slots, params, tokens, lengths,
                                  jax.random.fold_in(key, 0))
        count, done = np.zeros_like(lengths), np.zeros(len(lengths), bool)
        for step in range(int(budget.max())):
            current = pending
            if step + 1 < budget.max():  # dispatch the next step before reading this one
                # a finished row keeps running in lockstep, parked in its last slot
                positions = np.minimum(lengths + step, slots - 1).astype(np.int32)
                pending, cache = _decode(static, params, cache, current, positions,
                                         jax.random.fold_in(key, step + 1))
            new = np.asarray(current)
            eos = (new == eos_id) if eos_id is not None else np.zeros_like(done)
            emitted = ~done & ~eos
            count += emitted
            done = done | eos | (count >= budget)
            yield new, emitted, done.copy()
            if done.all():
                break


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def generate(params, config: model_lib.ModelConfig, prompts_tokens: Sequence[Sequence[int]],
             **kwargs) -> list[list[int]]:
    """The new tokens of each prompt (a list of token-id lists, any lengths), EOS left out.

    `params` are the Transformer's (as restored by `load_run`, or any other); `config` its
    ModelConfig. Keyword arguments as for `stream`: max_len (required: the context),
    max_new_tokens, temperature (0: greedy), top_k (0: off), top_p (1: off), seed, eos_id,
    mesh, rules. The same seed and prompts give the same tokens.
    """
    completions = [[] for _ in prompts_tokens]
    for tokens, emitted, _ in stream(params, config, prompts_tokens, **kwargs):
        for i in np.flatnonzero(emitted):
            completions[i].append(int(tokens[i]))
    return completions
