"""Text generation with a KV cache: a library API and `python -m jaxlm.generate`.

    python -m jaxlm.generate --from=runs/tiny --prompt="def main(" --max_new_tokens=64

Library: `generate(params, model_config, prompts_tokens, max_len=..., ...)` returns the new
tokens of each prompt; `stream(...)` yields them a step at a time.

How it runs. Prompts are right-padded to a bucket (a power of two, so a new prompt length
rarely compiles anything new) and the KV cache, [layers, batch, kv_heads, slots, head_dim],
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

import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxlm import files, platforms
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm.errors import GenerateError

CACHE_ROUND = 128  # cache slots are a multiple of this (or the whole context)
MIN_BUCKET = 16  # the shortest prompt bucket


def bucket_length(length: int, max_len: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), at most max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


def cache_slots(bucket: int, max_new_tokens: int, max_len: int) -> int:
    """Slots for a bucket's prompts and their new tokens; rounded so that nearby requests
    share one compiled decode step."""
    needed = -(-(bucket + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
    return max(bucket, min(needed, max_len))


def init_cache(cfg: model_lib.ModelConfig, batch: int, slots: int) -> dict | list:
    """Zeros: {"k", "v"} [layers, ...] for a scanned model, else one {"k", "v"} [1, ...] per
    layer (see ModelConfig.scan_layers)."""
    layers = cfg.n_layers if cfg.scan_layers else 1
    shape = (layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)
    names = ("layers", "batch", "act_kv_heads", None, None)

    def one():
        return {
            name: nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype), names)
            for name in ("k", "v")
        }

    return one() if cfg.scan_layers else [one() for _ in range(cfg.n_layers)]


def sample(logits, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row of float logits [b, vocab]: argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and
    to the nucleus (top_p): the most likely tokens whose probabilities, summed in decreasing
    order, first reach top_p (the most likely token is always in it; a token as likely as
    the nucleus' least likely one is in it too)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        # The nucleus as a threshold on logits: its smallest member's (sorting values only
        # and comparing is much cheaper than scattering a mask back through the sort order).
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        size = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(desc, size - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
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
            {"params": params},
            tokens,
            positions,
            head_inputs=True,
            cache=init_cache(static.cfg, batch, slots),
        )
        last = hidden[jnp.arange(batch), lengths - 1][:, None]  # each row's last real token
        logits = model_lib.logits_dot(last, head)[:, 0]
        return sample(logits, key, static.temperature, static.top_k, static.top_p), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(static: _Static, params, cache, tokens, positions, key):
    """One token per row: feed `tokens` [b] at `positions` [b], sample the next."""
    with nn.logical_axis_rules(static.rules):
        logits, cache = model_lib.Transformer(static.cfg).apply(
            {"params": params}, tokens[:, None], positions[:, None], cache=cache
        )
        return sample(logits[:, 0], key, static.temperature, static.top_k, static.top_p), cache


def _check(prompts, cfg, max_len, max_new_tokens, temperature, top_k, top_p):
    if not len(prompts):
        raise GenerateError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty: give at least one token")
        if len(p) >= max_len:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens; the model's context is "
                f"{max_len} tokens, so a prompt may have at most {max_len - 1}"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerateError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
    check_sampling(max_new_tokens, temperature, top_k, top_p)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if not 0 < top_p <= 1:
        raise GenerateError(
            f"top_p={top_p} is invalid: it must lie in (0, 1] (1: no nucleus filtering)"
        )
    if temperature < 0:
        raise GenerateError(f"temperature={temperature} is invalid: 0 (greedy) or more")
    if top_k < 0:
        raise GenerateError(f"top_k={top_k} is invalid: 0 (off) or more")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens} is invalid: at least 1")


def stream(
    params,
    config: model_lib.ModelConfig,
    prompts_tokens: Sequence[Sequence[int]],
    *,
    max_len: int,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    mesh=None,
    rules: Sequence = (),
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Generate for a batch of prompts, yielding after each step (tokens, emitted, done),
    NumPy [batch] each: row i's completion grows by tokens[i] where emitted[i]; done[i] once
    row i has produced eos_id (not emitted) or max_new_tokens tokens, or filled the context
    (`max_len`, the length the model was trained on). Runs under `mesh` (if given) with the
    logical axis `rules` the params were sharded by; see `generate` for the rest."""
    _check(prompts_tokens, config, max_len, max_new_tokens, temperature, top_k, top_p)
    static = _Static(
        config,
        tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules),
        float(temperature),
        int(top_k),
        float(top_p),
    )
    lengths = np.array([len(p) for p in prompts_tokens], np.int32)
    bucket = bucket_length(int(lengths.max()), max_len)
    slots = cache_slots(bucket, max_new_tokens, max_len)
    budget = np.minimum(max_new_tokens, max_len - lengths)  # new tokens each row may have
    tokens = np.zeros((len(lengths), bucket), np.int32)
    for i, p in enumerate(prompts_tokens):
        tokens[i, : len(p)] = p
    key = jax.random.key(seed)

    def on_mesh():  # entered around each call only: the caller's code between steps is its own
        return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()

    with on_mesh():
        pending, cache = _prefill(
            static, slots, params, tokens, lengths, jax.random.fold_in(key, 0)
        )
    count, done = np.zeros_like(lengths), np.zeros(len(lengths), bool)
    for step in range(int(budget.max())):
        current = pending
        if step + 1 < budget.max():  # dispatch the next step before reading this one
            # a finished row keeps running in lockstep, parked in its last slot
            positions = np.minimum(lengths + step, slots - 1).astype(np.int32)
            with on_mesh():
                pending, cache = _decode(
                    static, params, cache, current, positions, jax.random.fold_in(key, step + 1)
                )
        new = np.asarray(current)
        eos = (new == eos_id) if eos_id is not None else np.zeros_like(done)
        emitted = ~done & ~eos
        count += emitted
        done = done | eos | (count >= budget)
        yield new, emitted, done.copy()
        if done.all():
            break


def generate(
    params, config: model_lib.ModelConfig, prompts_tokens: Sequence[Sequence[int]], **kwargs
) -> list[list[int]]:
    """The new tokens of each prompt (a list of token-id lists, any lengths), EOS left out.

    `params` are the Transformer's (as restored by jaxlm.run's `load`, or any other); `config` its
    ModelConfig. Keyword arguments as for `stream`: max_len (required: the context),
    max_new_tokens, temperature (0: greedy), top_k (0: off), top_p (1: off), seed, eos_id,
    mesh, rules. The same seed and prompts give the same tokens.
    """
    completions = [[] for _ in prompts_tokens]
    for tokens, emitted, _ in stream(params, config, prompts_tokens, **kwargs):
        for i in np.flatnonzero(emitted):
            completions[i].append(int(tokens[i]))
    return completions


# ---------------------------------------------------------------- command line


def _read_prompts(texts: list[str], path: str | None) -> list[str]:
    prompts = list(texts)
    if path:
        if not epath.Path(path).is_file():
            raise GenerateError(
                f"--prompts_file={path}: no such file; give a JSONL file of "
                '{"prompt": TEXT} lines'
            )
        for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if isinstance(row, dict) else row)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GenerateError(
                    f'{path} line {n}: expected a JSON object with a "prompt" '
                    "string (or a JSON string)"
                ) from None
    if not prompts:
        raise GenerateError("no prompts: give --prompt=TEXT (repeatable) or --prompts_file=F.jsonl")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise GenerateError(f"prompt {i} is empty (or not a string): give some text")
    return prompts


def completion_text(sp, prompt_tokens: list[int], completion: list[int]) -> str:
    """The completion's text as it continues the prompt (decoded alone, sentencepiece would
    drop the space that starts it); a trailing partial multi-byte character is left out."""
    prompt = sp.decode(prompt_tokens)
    text = sp.decode(prompt_tokens + completion)
    text = text[len(prompt) :] if text.startswith(prompt) else sp.decode(completion)
    return text.rstrip("\ufffd")


class _Printer:
    """Streams completions to the console in order: the first prompt's as it grows; once its
    row finishes, the next prompt with what its row produced meanwhile, and so on."""

    def __init__(
        self, sp, prompts: list[str], tokens: list[list[int]], first_index: int, out=sys.stdout
    ):
        self.sp, self.prompts, self.tokens, self.first = sp, prompts, tokens, first_index
        self.out, self.row, self.shown = out, 0, None  # None: the row's prompt not printed yet

    def update(self, completions, done) -> None:
        while self.row < len(self.prompts):
            if self.shown is None:
                self.out.write(f"[{self.first + self.row}] {self.prompts[self.row]}")
                self.shown = ""
            text = completion_text(self.sp, self.tokens[self.row], completions[self.row])
            if text.startswith(self.shown):
                self.out.write(text[len(self.shown) :])
                self.shown = text
            if not done[self.row]:
                break
            self.out.write("\n")
            self.row, self.shown = self.row + 1, None
        self.out.flush()


def run_prompts(run: run_lib.Run, prompts: list[str], batch_size: int, printer=None, **sampling):
    """Completions (dicts for JSONL) of text prompts, `batch_size` at a time."""
    sp, results = run.tokenizer, []
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start : start + batch_size]
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []  # training documents start with BOS
        tokens = [bos + sp.encode(t) for t in texts]
        completions, finished = [[] for _ in texts], [None] * len(texts)
        printer_rows = printer(texts, tokens, start) if printer else None
        for new, emitted, done in stream(
            run.params, run.config, tokens, **run.kwargs(), **sampling
        ):
            for i in range(len(texts)):
                if emitted[i]:
                    completions[i].append(int(new[i]))
                if done[i] and finished[i] is None:
                    finished[i] = "length" if emitted[i] else "eos"
            if printer_rows:
                printer_rows.update(completions, done)
        results += [
            {"prompt": t, "completion": completion_text(sp, p, c), "tokens": c, "stop": s}
            for t, p, c, s in zip(texts, tokens, completions, finished)
        ]
    return results


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    try:
        output = files.output_file(f.output, "--output") if f.output else None
        prompts = _read_prompts(f.prompt or [], f.prompts_file)
        check_sampling(f.max_new_tokens, f.temperature, f.top_k, f.top_p)
        if f.batch_size < 1:
            raise GenerateError(f"--batch_size={f.batch_size} is invalid: at least 1")
        sampling = dict(
            max_new_tokens=f.max_new_tokens,
            temperature=f.temperature,
            top_k=f.top_k,
            top_p=f.top_p,
            seed=f.seed,
        )
        run = run_lib.load(f["from"].value, f.tokenizer, f.step, f.tensor)
        printer = None if f.output else functools.partial(_Printer, run.tokenizer)
        results = run_prompts(run, prompts, f.batch_size, printer, **sampling)
    except (GenerateError, run_lib.RunError, files.PathError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if output:
        output.write_text("".join(json.dumps(row) + "\n" for row in results))
        print(f"wrote {len(results)} completions to {output}")


def _define_flags():
    from absl import flags

    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several.")
    flags.DEFINE_string("prompts_file", None, 'JSONL of {"prompt": TEXT} lines.')
    flags.DEFINE_string("output", None, "Write JSONL completions here instead of streaming.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1] (1: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 8, "Prompts generated together.")


if __name__ == "__main__":
    run_lib.cli(_define_flags, main)
