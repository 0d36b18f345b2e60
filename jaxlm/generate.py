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
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxlm import files
from jaxlm import model as model_lib
from jaxlm import platforms
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
        return {name: nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype), names)
                for name in ("k", "v")}
    return one() if cfg.scan_layers else [one() for _ in range(cfg.n_layers)]


def for_decoding(params: dict, config: model_lib.ModelConfig, free: bool = False):
    """(params, config) as decoding runs fastest: a module per layer, its weights unstacked
    from training's [layers, ...] arrays (a scanned layer's weights are sliced out of the
    stack at every step: a copy of every weight per token, on CPU). With `free`, each stacked
    array is deleted once split, so the weights are held about once, not twice."""
    if not config.scan_layers:
        return params, config
    params = dict(params)
    leaves, treedef = jax.tree.flatten(params.pop("layers"))
    layers = [[] for _ in range(config.n_layers)]
    for leaf in leaves:
        pieces = [leaf[n] for n in range(config.n_layers)]
        for layer, piece in zip(layers, pieces):
            layer.append(piece)
        if free and isinstance(leaf, jax.Array):
            jax.block_until_ready(pieces)
            leaf.delete()
    for n, layer in enumerate(layers):
        params[f"layers_{n}"] = jax.tree.unflatten(treedef, layer)
    return params, dataclasses.replace(config, scan_layers=False)


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
    check_sampling(max_new_tokens, temperature, top_k, top_p)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
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

    def on_mesh():  # entered around each call only: the caller's code between steps is its own
        return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()

    with on_mesh():
        pending, cache = _prefill(static, slots, params, tokens, lengths,
                                  jax.random.fold_in(key, 0))
    count, done = np.zeros_like(lengths), np.zeros(len(lengths), bool)
    for step in range(int(budget.max())):
        current = pending
        if step + 1 < budget.max():  # dispatch the next step before reading this one
            # a finished row keeps running in lockstep, parked in its last slot
            positions = np.minimum(lengths + step, slots - 1).astype(np.int32)
            with on_mesh():
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


# ---------------------------------------------------------------- a run's checkpoint


@dataclasses.dataclass
class Run:
    """What generating from a training run needs: its params (on `mesh`), model config,
    context length, tokenizer, and the logical rules the params are sharded by."""

    params: dict
    config: model_lib.ModelConfig
    max_len: int
    tokenizer: object
    mesh: jax.sharding.Mesh
    rules: tuple
    step: int
    tokenizer_path: str = ""

    def kwargs(self) -> dict:
        """The keyword arguments of `generate` / `stream` this run fixes."""
        return dict(max_len=self.max_len, eos_id=self.tokenizer.eos_id(), mesh=self.mesh,
                    rules=self.rules)


def _config_from_json(saved: dict):
    """The run's ConfigDict from the dict its checkpoint recorded (JSON turned tuples into
    lists: put them back where the schema has tuples)."""
    from jaxlm import config as config_lib

    def merge(node, values, where):
        for key, value in values.items():
            if key not in node:
                raise GenerateError(f"the checkpoint's config has a field {where}{key} this "
                                    "jaxlm does not know; generate with the jaxlm that trained it")
            if hasattr(node[key], "keys"):
                merge(node[key], value, f"{where}{key}.")
            else:
                node[key] = _tuples(value) if isinstance(node[key], tuple) else value

    config = config_lib.default_config()
    merge(config, saved, "config.")
    return config


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _tokenizer(run_dir: epath.Path, recorded: str, given: str | None):
    """(the tokenizer, its file)."""
    from jaxlm.data import tokenizer as tokenizer_lib

    if given:
        return tokenizer_lib.load(given, field="--tokenizer"), str(given)
    for candidate in (recorded, run_dir / "tokenizer.model"):
        if candidate and epath.Path(candidate).is_file():
            return tokenizer_lib.load(candidate, field="the run's tokenizer"), str(candidate)
    raise GenerateError(
        f"{run_dir} has no tokenizer: its checkpoint records {recorded or 'none'!r}, which is "
        f"not a file, and there is no {run_dir / 'tokenizer.model'}; pass --tokenizer=PATH to "
        "the sentencepiece model it was trained with")


def load_run(run_dir: epath.PathLike, tokenizer: str | None = None, step: int | None = None,
             tensor: int | None = None, devices=None, shard_rows: bool = False,
             unstack: bool = True) -> Run:
    """A training run's newest (or `step`'s) params, restored onto a generation mesh over
    `devices` (default: all): tensor-parallel `tensor` ways (default: as the run trained, if
    that divides the devices) and FSDP over the rest. Weights keep their training layout.
    Rows are split over the FSDP devices with `shard_rows` (scoring many rows, jaxlm.eval),
    else not (a generation batch is small). With `unstack` (for generating) the layers'
    weights are unstacked, see `for_decoding`; without, they stay as training scans them."""
    from jaxlm import checkpoint as checkpoint_lib
    from jaxlm import config as config_lib
    from jaxlm import sharding as sharding_lib

    run_dir = files.path(run_dir)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise GenerateError(f"--from={str(run_dir)!r}: no checkpoints/ directory there; give "
                            "a run directory (python -m jaxlm.train --workdir=...)")
    manager, step = checkpoint_lib.open_read_only(directory, step)
    if step is None or step not in manager.all_steps():
        raise GenerateError(f"{directory} has no checkpoint {step if step is not None else ''}"
                            f"(it has {list(manager.all_steps())})")
    meta = checkpoint_lib.read_meta(manager, step)
    manager.close()
    if meta.get("lora_base"):
        raise GenerateError(f"{run_dir} is a LoRA run (its checkpoints hold adapters only); "
                            f"merge it first: python -m jaxlm.convert --from_run={run_dir} "
                            "--merge_lora --to=NEW_RUN, then --from=NEW_RUN")
    sp, tokenizer_path = _tokenizer(run_dir, meta.get("tokenizer", ""), tokenizer)

    config = _config_from_json(meta["config"])
    devices = list(devices if devices is not None else jax.devices())
    if tensor is None:
        tensor = config.mesh.tensor if len(devices) % config.mesh.tensor == 0 else 1
    # The cached path has its own attention: the training kernel and remat do not matter.
    config.mesh.update(dict(data=1, fsdp=-1, tensor=tensor, sequence=1))
    config.model.update(dict(attention="xla", remat="none"))
    config.data.seq_len_schedule = ()
    config.train.update(dict(global_batch_size=len(devices), grad_accum_steps=1, loss_chunks=1))
    try:
        derived = config_lib.validate(config, len(devices))
    except config_lib.ConfigError as e:
        raise GenerateError(f"cannot generate from {run_dir} on {len(devices)} devices with "
                            f"tensor={tensor}: {e}") from e
    cfg = config_lib.model_config(config, derived)
    if sp.vocab_size() > cfg.vocab_size:
        raise GenerateError(f"the tokenizer has {sp.vocab_size()} pieces but the model only "
                            f"{cfg.vocab_size}: it is not the run's tokenizer")
    mesh = sharding_lib.make_mesh(derived.mesh_shape, devices)
    rows = () if shard_rows else (("batch", None),)
    rules = sharding_lib.axis_rules(tuple(config.mesh.rules) + rows + (("length", None),))
    model = model_lib.Transformer(cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, 8), jnp.int32))["params"])
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    params, step = checkpoint_lib.restore_params(directory / str(step), abstract)
    if unstack:
        params, cfg = for_decoding(params, cfg, free=True)
    return Run(params, cfg, int(config.data.seq_len), sp, mesh, rules, step, tokenizer_path)


# ---------------------------------------------------------------- command line


def _read_prompts(texts: list[str], path: str | None) -> list[str]:
    prompts = list(texts)
    if path:
        if not epath.Path(path).is_file():
            raise GenerateError(f"--prompts_file={path}: no such file; give a JSONL file of "
                                '{"prompt": TEXT} lines')
        for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if isinstance(row, dict) else row)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GenerateError(f"{path} line {n}: expected a JSON object with a \"prompt\" "
                                    "string (or a JSON string)") from None
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
    text = text[len(prompt):] if text.startswith(prompt) else sp.decode(completion)
    return text.rstrip("\ufffd")


class _Printer:
    """Streams completions to the console in order: the first prompt's as it grows; once its
    row finishes, the next prompt with what its row produced meanwhile, and so on."""

    def __init__(self, sp, prompts: list[str], tokens: list[list[int]], first_index: int,
                 out=sys.stdout):
        self.sp, self.prompts, self.tokens, self.first = sp, prompts, tokens, first_index
        self.out, self.row, self.shown = out, 0, None  # None: the row's prompt not printed yet

    def update(self, completions, done) -> None:
        while self.row < len(self.prompts):
            if self.shown is None:
                self.out.write(f"[{self.first + self.row}] {self.prompts[self.row]}")
                self.shown = ""
            text = completion_text(self.sp, self.tokens[self.row], completions[self.row])
            if text.startswith(self.shown):
                self.out.write(text[len(self.shown):])
                self.shown = text
            if not done[self.row]:
                break
            self.out.write("\n")
            self.row, self.shown = self.row + 1, None
        self.out.flush()


def run_prompts(run: Run, prompts: list[str], batch_size: int, printer=None, **sampling):
    """Completions (dicts for JSONL) of text prompts, `batch_size` at a time."""
    sp, results = run.tokenizer, []
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start:start + batch_size]
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []  # training documents start with BOS
        tokens = [bos + sp.encode(t) for t in texts]
        completions, finished = [[] for _ in texts], [None] * len(texts)
        printer_rows = printer(texts, tokens, start) if printer else None
        for new, emitted, done in stream(run.params, run.config, tokens, **run.kwargs(),
                                         **sampling):
            for i in range(len(texts)):
                if emitted[i]:
                    completions[i].append(int(new[i]))
                if done[i] and finished[i] is None:
                    finished[i] = "length" if emitted[i] else "eos"
            if printer_rows:
                printer_rows.update(completions, done)
        results += [{"prompt": t, "completion": completion_text(sp, p, c), "tokens": c,
                     "stop": s} for t, p, c, s in zip(texts, tokens, completions, finished)]
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
        sampling = dict(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                        top_k=f.top_k, top_p=f.top_p, seed=f.seed)
        run = load_run(f["from"].value, f.tokenizer, f.step, f.tensor)
        printer = None if f.output else functools.partial(_Printer, run.tokenizer)
        results = run_prompts(run, prompts, f.batch_size, printer, **sampling)
    except (GenerateError, files.PathError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if output:
        output.write_text("".join(json.dumps(row) + "\n" for row in results))
        print(f"wrote {len(results)} completions to {output}")


def define_run_flags():
    """The flags that pick a run's checkpoint and its mesh (jaxlm.generate, jaxlm.eval)."""
    from absl import flags

    flags.DEFINE_string("from", None, "A run directory (python -m jaxlm.train --workdir).")
    flags.DEFINE_string("tokenizer", None, "Tokenizer file, a sentencepiece .model or a "
                        "tokenizer.json (default: the run's).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("tensor", None, "Tensor-parallel ways (default: the run's).")
    flags.mark_flag_as_required("from")


def run_cli(define_flags, main) -> None:
    """`python -m` entry of a command that reads a run: its own flags, the run flags, main."""
    from absl import app, logging

    define_run_flags()
    define_flags()
    logging.set_verbosity(logging.ERROR)  # orbax warns about every read-only checkpoint
    app.run(main)


def _define_flags():
    from absl import flags

    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several.")
    flags.DEFINE_string("prompts_file", None, "JSONL of {\"prompt\": TEXT} lines.")
    flags.DEFINE_string("output", None, "Write JSONL completions here instead of streaming.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1] (1: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 8, "Prompts generated together.")


if __name__ == "__main__":
    run_cli(_define_flags, main)
