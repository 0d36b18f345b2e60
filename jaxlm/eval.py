"""Score a checkpoint: loss and perplexity on documents, accuracy on multiple-choice items.

    python -m jaxlm.eval --from=runs/tiny --data=data/prepared [--split=validation]
    python -m jaxlm.eval --from=runs/tiny --data='texts/*.jsonl' --choices=items.jsonl
    python -m jaxlm.eval --from=runs/tiny --tasks=hellaswag,arc_easy  (lm-eval: jaxlm.eval_tasks)

Everything is a log-likelihood request, as in lm-evaluation-harness: the log-probability the
model gives a continuation after a context. A document of tokens t0..tn (t0 the BOS that
training documents start with) is cut into windows that each predict up to `max_len`
tokens from the token before them, so every token after t0 is predicted exactly once and
no window is longer than the context the model was trained on. Its loss is the mean
negative log-likelihood over those tokens, perplexity exp(loss), and for texts (not
prepared tokens) bits per byte too, which compares across tokenizers. Documents prepared as
SFT data (tokens and a loss mask) are scored on their responses only, each after all that
precedes it: the completion loss.

A multiple-choice item {"context", "choices", "answer"} asks for log P(choice | context) of
each choice, split as the harness does (`split_pair`, which jaxlm.harness's lm-eval model
uses too): BOS + tokens(context) as the context, and as the continuation the tokens of
context + choice after those of the context (whitespace ending the context moves to the
choice). `acc` picks the most likely choice, `acc_norm` the
most likely per character of the choice.

Every request goes through one scorer (jaxlm.scorer): batched by length, rows over every
device, a context shared by several requests (an item's choices) computed once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath

from jaxlm import eval_tasks, files, platforms, scorer
from jaxlm import run as run_lib
from jaxlm.errors import EvalError

# The scorer's names, for callers of jaxlm.eval.
Request, Score, score = scorer.Request, scorer.Score, scorer.score


# ---------------------------------------------------------------- documents


def document_requests(tokens: np.ndarray, max_len: int) -> list[Request]:
    """Windows predicting tokens[1:], each up to max_len tokens from the one before it."""
    tokens = tuple(int(t) for t in tokens)
    return [
        Request(tokens[start - 1 : start], tokens[start : start + max_len])
        for start in range(1, len(tokens), max_len)
    ]


def masked_requests(tokens: np.ndarray, mask: np.ndarray) -> list[Request]:
    """One request per run of trained tokens (an SFT document's responses), after all that
    precedes it."""
    tokens, edges = [int(t) for t in tokens], np.diff(np.concatenate([[0], mask != 0, [0]]))
    return [
        Request(tuple(tokens[:start]), tuple(tokens[start:end]))
        for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
        if start > 0
    ]


def score_documents(
    run: run_lib.Run,
    documents: Iterable[np.ndarray],
    batch_size: int = 16,
    n_bytes: int | None = None,
) -> dict:
    """Loss (mean NLL per predicted token, nats), perplexity, token and document counts; with
    the texts' UTF-8 byte count, bits per byte as well. A [2, n] document (tokens and loss
    mask, as SFT data is prepared) is scored on its masked-in tokens only."""
    requests, owner, n_documents = [], [], 0  # owner: the document each request scores
    for doc in documents:
        mine = masked_requests(*doc) if doc.ndim == 2 else document_requests(doc, run.max_len)
        requests += mine
        owner += [n_documents] * len(mine)
        n_documents += 1
    if not requests:
        raise EvalError(
            "no document has a token to predict (two or more tokens; SFT data: a response)"
        )
    scores = score(run, requests, batch_size)
    per_document = [{"document": i, "nll": 0.0, "tokens": 0} for i in range(n_documents)]
    for i, request, scored in zip(owner, requests, scores):
        per_document[i]["nll"] -= scored.logprob
        per_document[i]["tokens"] += len(request.continuation)
    for row in per_document:
        row["loss"] = row.pop("nll") / row["tokens"] if row["tokens"] else None
    total = -sum(s.logprob for s in scores)
    tokens = sum(len(r.continuation) for r in requests)
    result = {
        "loss": total / tokens,
        "perplexity": math.exp(total / tokens),
        "tokens": tokens,
        "documents": n_documents,
        "per_document": per_document,
    }
    if n_bytes:
        result["bits_per_byte"] = total / math.log(2) / n_bytes
    return result


def read_texts(pattern: str, text_key: str = "text") -> tuple[list[str], list[str]]:
    """The texts of JSONL / .txt files (globs; .gz, .zst) as `prepare` reads them, and a line
    per kind of skipped record."""
    from jaxlm.data import readers

    try:
        paths = readers.expand([pattern], flag="--data")
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    skipped = readers.Skipped()
    texts = [text for path in paths for text, _ in readers.read(path, text_key, skipped=skipped)]
    return texts, skipped.report()


def prepared_documents(run: run_lib.Run, root: str, split: str):
    """The token documents of a prepared dataset's split, checked to share the run's tokenizer."""
    from jaxlm.data import prepared
    from jaxlm.errors import ConfigError

    try:
        dataset = prepared.PreparedDataset(root, field="--data")
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if split not in dataset.metadata["splits"]:
        raise EvalError(f"--split={split!r}: {root} has splits {list(dataset.metadata['splits'])}")
    if run.tokenizer_path and (
        prepared.file_sha256(dataset.tokenizer_path) != prepared.file_sha256(run.tokenizer_path)
    ):
        raise EvalError(
            f"--data={root} was tokenized with {dataset.tokenizer_path}, not the "
            f"run's tokenizer {run.tokenizer_path}: its token ids mean other "
            "pieces. Prepare the data again with --tokenizer="
            f"{run.tokenizer_path}"
        )
    docs = dataset.documents(split)
    return (docs[i] for i in range(len(docs)))


# ---------------------------------------------------------------- multiple choice


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple
    answer: int
    where: str


def read_items(path: str) -> list[Item]:
    """Multiple-choice items, one JSON object per line: {"context": str, "choices": [str, ...],
    "answer": index of the right choice}."""
    items = []
    try:
        lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--choices={path!r}: cannot read it ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            context, choices, answer = row["context"], row["choices"], row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalError(
                f'{where}: expected a JSON object with "context" (a string), '
                '"choices" (a list of strings) and "answer" (the right '
                "choice's index)"
            ) from None
        ok = (
            isinstance(context, str)
            and isinstance(choices, list)
            and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)
        )
        if not ok:
            raise EvalError(
                f'{where}: "context" must be a string and "choices" a list of '
                "two or more non-empty strings"
            )
        if type(answer) is not int or not 0 <= answer < len(choices):
            raise EvalError(
                f'{where}: "answer" is {answer!r}; it must be an index into '
                f'"choices" (0 to {len(choices) - 1})'
            )
        items.append(Item(context, tuple(choices), answer, where))
    if not items:
        raise EvalError(f"--choices={path!r} has no items")
    return items


def with_bos(tokenizer, tokens: list[int]) -> list[int]:
    """BOS + tokens, as training documents start (and a Hugging Face Llama tokenizer encodes)."""
    return ([tokenizer.bos_id()] if tokenizer.bos_id() >= 0 else []) + list(tokens)


def split_pair(tokenizer, context: str, continuation: str) -> Request:
    """log P(continuation | context) as a token request, split as lm-evaluation-harness's
    Hugging Face model splits it: whitespace ending the context moves to the continuation;
    BOS + tokens(context) is the context and the tokens of BOS + context + continuation after
    it the continuation. An empty context is BOS alone (EOS without a BOS)."""
    if not context:
        tokens = tokenizer.encode(continuation)
        prefix = tokenizer.bos_id() if tokenizer.bos_id() >= 0 else tokenizer.eos_id()
        if tokens and tokens[0] == prefix:
            return Request(tuple(tokens[:1]), tuple(tokens[1:]))
        return Request((prefix,), tuple(tokens))
    kept = context.rstrip()
    context, continuation = kept, context[len(kept) :] + continuation
    context_tokens = with_bos(tokenizer, tokenizer.encode(context))
    whole = with_bos(tokenizer, tokenizer.encode(context + continuation))
    return Request(tuple(context_tokens), tuple(whole[len(context_tokens) :]))


def choice_requests(tokenizer, item: Item) -> list[Request]:
    """One request per choice, split as the harness splits it (split_pair)."""
    requests = []
    for choice in item.choices:
        request = split_pair(tokenizer, item.context, choice)
        if not request.context or min(request.context) < 0:
            raise EvalError(f"{item.where}: an empty context needs a tokenizer with a BOS token")
        if not request.continuation:
            raise EvalError(f"{item.where}: the choice {choice!r} adds no tokens to the context")
        requests.append(request)
    return requests


def score_choices(run: run_lib.Run, items: Sequence[Item], batch_size: int = 16) -> dict:
    """Accuracy (acc), length-normalised accuracy (acc_norm) and each item's log-likelihoods."""
    requests = [r for item in items for r in choice_requests(run.tokenizer, item)]
    scores = iter(score(run, requests, batch_size))
    per_item, right, right_norm = [], 0, 0
    for item in items:
        logprobs = np.array([next(scores).logprob for _ in item.choices])
        normalised = logprobs / np.array([len(c) for c in item.choices])
        right += int(np.argmax(logprobs) == item.answer)
        right_norm += int(np.argmax(normalised) == item.answer)
        per_item.append(
            {
                "where": item.where,
                "logprobs": logprobs.tolist(),
                "pick": int(np.argmax(logprobs)),
                "answer": item.answer,
            }
        )
    return {
        "acc": right / len(items),
        "acc_norm": right_norm / len(items),
        "items": len(items),
        "per_item": per_item,
    }


# ---------------------------------------------------------------- command line


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    if not f.data and not f.choices and not f.tasks:
        raise SystemExit(
            "error: give --tasks (lm-eval tasks), --data (documents: a prepared dataset or "
            "JSONL texts) and/or --choices (multiple-choice JSONL)"
        )
    if f.batch_size < 1:
        raise SystemExit(f"error: --batch_size={f.batch_size} is invalid: at least 1")
    results = {}
    try:
        output = files.output_file(f.output, "--output") if f.output else None
        if f.tasks:
            eval_tasks.harness()  # no lm-eval: one line naming the extra, before loading
        run = run_lib.load(
            f["from"].value, f.tokenizer, f.step, f.tensor, shard_rows=True, unstack=False
        )
        print(
            f"{f['from'].value} step {run.step} on {run.mesh.devices.size} devices "
            f"({dict(run.mesh.shape)}), context {run.max_len}",
            flush=True,
        )
        if f.data:
            if epath.Path(f.data).is_dir():
                docs, n_bytes, skipped = prepared_documents(run, f.data, f.split), None, []
            else:
                texts, skipped = read_texts(f.data, f.text_key)
                if not texts:
                    raise EvalError(f"--data={f.data!r} has no usable text: {skipped}")
                from jaxlm.data import pipeline

                docs = pipeline.tokenize(run.tokenizer, texts)
                n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            for line in skipped:
                print(f"skipped {line}")
            results["documents"] = score_documents(run, docs, f.batch_size, n_bytes)
            r = results["documents"]
            print(
                f"documents: loss {r['loss']:.4f} | perplexity {r['perplexity']:.3f} | "
                f"{r['tokens']} tokens in {r['documents']} documents"
                + (f" | {r['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in r else "")
            )
        if f.choices:
            results["choices"] = score_choices(run, read_items(f.choices), f.batch_size)
            r = results["choices"]
            print(
                f"choices: acc {r['acc']:.4f} | acc_norm {r['acc_norm']:.4f} | {r['items']} items"
            )
        if f.tasks:
            eval_tasks.run_from_flags(run, f)
    except (EvalError, run_lib.RunError, files.PathError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if output and results:
        output.write_text(
            json.dumps({"from": f["from"].value, "step": run.step, **results}, indent=1)
        )
        print(f"wrote {f.output}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string(
        "data",
        None,
        "Documents: a prepared dataset directory, or JSONL/.txt texts (a glob; .gz/.zst read too).",
    )
    flags.DEFINE_string("split", "validation", "The prepared dataset's split to score.")
    flags.DEFINE_string("text_key", "text", "The JSONL field holding each text.")
    flags.DEFINE_string(
        "choices", None, 'Multiple-choice JSONL: {"context", "choices", "answer"} per line.'
    )
    flags.DEFINE_integer("batch_size", 16, "Rows per forward pass (rounded up to the devices).")
    flags.DEFINE_string("output", None, "Also write the results (and per-item scores) as JSON.")
    eval_tasks.define_flags()


if __name__ == "__main__":
    run_lib.cli(_define_flags, main)
