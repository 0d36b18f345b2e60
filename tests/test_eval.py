"""jaxlm.eval against transformers: the same run exported to Hugging Face, scored by PyTorch.

The reference re-derives what is scored from the definitions (windows of the context
length predicting every token after BOS; the harness' context/continuation split) and
computes log-probabilities with transformers' LlamaForCausalLM on the exported weights, in
float64.
"""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from support import float32_roundoff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import convert, scorer  # noqa: E402
from jaxlm import eval as eval_lib  # noqa: E402
from jaxlm import generate as gen  # noqa: E402
from jaxlm import run as run_lib  # noqa: E402

CONTEXT = 64
TEXTS = [
    "def main():\n    return 1",
    # longer than the context: scored in several windows
    "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
    "class Reader:\n    def __init__(self, root):\n        self.root = root\n\n"
    "    def files(self):\n        return sorted(os.listdir(self.root))\n\n"
    "    def size(self, name):\n"
    "        return os.path.getsize(os.path.join(self.root, name))\n" * 2,
    "x = [i * i for i in range(10)]",
]
ITEMS = [
    {"context": "def add(a, b):\n    return a ", "choices": ["+ b", "- b", "* b"]},
    {"context": "import", "choices": [" os", " sys", " json", " re"]},
    {"context": "", "choices": ["def f():", "class A:"]},
    {"context": "for i in range(10):\n    ", "choices": ["print(i)", "pass"]},
]


@pytest.fixture(scope="module")
def run_dir(small_run):
    return small_run


@pytest.fixture(scope="module")
def hf(run_dir, tmp_path_factory):
    """The run exported and loaded by transformers, computing in float64 (eager attention): a
    reference free of float32 round-off."""
    out = tmp_path_factory.mktemp("hf")
    convert.export_hf(run_dir, out, dtype="float32")
    return transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float64, attn_implementation="eager"
    ).eval()


def reference_logprobs(hf, tokens):
    """log P(tokens[i] | tokens[:i]) for i >= 1, float64, from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1)[
        torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])
    ].numpy()


def reference_document_nll(hf, tokens):
    """Summed NLL of tokens[1:], each window predicting CONTEXT tokens from the one before."""
    total = 0.0
    for start in range(1, len(tokens), CONTEXT):
        total -= reference_logprobs(hf, tokens[start - 1 : start + CONTEXT]).sum()
    return total


def test_document_loss_and_perplexity_match_transformers(run_dir, hf):
    run = run_lib.load(run_dir, shard_rows=True)
    sp = run.tokenizer
    docs = [[sp.bos_id()] + sp.encode(t) + [sp.eos_id()] for t in TEXTS]
    assert max(map(len, docs)) > 2 * CONTEXT  # several windows
    got = eval_lib.score_documents(
        run,
        [np.asarray(d) for d in docs],
        batch_size=4,
        n_bytes=sum(len(t.encode()) for t in TEXTS),
    )
    nll = sum(reference_document_nll(hf, d) for d in docs)
    tokens = sum(len(d) - 1 for d in docs)
    assert got["tokens"] == tokens and got["documents"] == len(TEXTS)
    np.testing.assert_allclose(got["loss"], nll / tokens, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nll / tokens), rtol=1e-5)
    np.testing.assert_allclose(
        got["bits_per_byte"], nll / math.log(2) / sum(len(t.encode()) for t in TEXTS), rtol=1e-5
    )


def test_sft_documents_are_scored_on_their_responses(run_dir, hf):
    run = run_lib.load(run_dir, shard_rows=True)
    tokens = np.asarray([run.tokenizer.bos_id()] + run.tokenizer.encode(TEXTS[1])[:50])
    mask = np.zeros_like(tokens)
    mask[10:20] = mask[30:45] = 1  # two responses
    got = eval_lib.score_documents(run, [np.stack([tokens, mask])])
    logprobs = reference_logprobs(hf, tokens.tolist())  # logprobs[i]: token i + 1
    want = -logprobs[mask[1:] == 1].sum() / 25
    assert got["tokens"] == 25
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)


def harness_split(sp, context, choice):
    """lm-evaluation-harness' tokenization of a (context, choice) pair, re-derived: its
    `_encode_pair` moves all whitespace ending the context (context.rstrip()) to the choice."""
    if context != context.rstrip():
        stripped = context.rstrip()
        context, choice = stripped, context[len(stripped) :] + choice
    context_ids = sp.encode(context) if context else []
    return [sp.bos_id()] + context_ids, sp.encode(context + choice)[len(context_ids) :]


def test_multiple_choice_log_likelihoods_and_accuracy_match_transformers(run_dir, hf, tmp_path):
    run = run_lib.load(run_dir, shard_rows=True)
    sp = run.tokenizer
    want = []
    for item in ITEMS:
        row = []
        for choice in item["choices"]:
            context, continuation = harness_split(sp, item["context"], choice)
            row.append(reference_logprobs(hf, context + continuation)[-len(continuation) :].sum())
        want.append(np.array(row))
    # The right answer is the reference's pick for the first two items and another choice for
    # the last two, so accuracy is 0.5 exactly when the picks agree.
    for item, logprobs, right in zip(ITEMS, want, (True, True, False, False)):
        pick = int(np.argmax(logprobs))
        item["answer"] = pick if right else (pick + 1) % len(logprobs)
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    got = eval_lib.score_choices(run, eval_lib.read_items(str(path)), batch_size=4)
    for row, logprobs in zip(got["per_item"], want):
        np.testing.assert_allclose(row["logprobs"], logprobs, rtol=1e-5, atol=1e-5)
    assert got["acc"] == 0.5 and got["items"] == 4
    normalised = [
        np.argmax(w / [len(c) for c in it["choices"]]) == it["answer"] for w, it in zip(want, ITEMS)
    ]
    assert got["acc_norm"] == np.mean(normalised)


def test_the_models_own_greedy_continuation_is_greedy(run_dir):
    run = run_lib.load(run_dir)
    context = [run.tokenizer.bos_id()] + run.tokenizer.encode("def main(")
    greedy = gen.generate(
        run.params,
        run.config,
        [context],
        max_new_tokens=4,
        temperature=0.0,
        **{**run.kwargs(), "eos_id": None},
    )[0]
    other = greedy[:-1] + [(greedy[-1] + 1) % run.config.vocab_size]
    scores = eval_lib.score(
        run,
        [
            eval_lib.Request(tuple(context), tuple(greedy)),
            eval_lib.Request(tuple(context), tuple(other)),
        ],
    )
    assert scores[0].greedy and not scores[1].greedy
    assert scores[0].logprob > scores[1].logprob


def test_every_mesh_scores_the_same(run_dir):
    """8 devices (rows over fsdp 4, vocab and heads over tensor 2) = one device."""
    sharded = run_lib.load(run_dir, shard_rows=True)
    single = run_lib.load(run_dir, tensor=1, devices=jax.devices()[:1], shard_rows=True)
    assert sharded.mesh.devices.size == 8 and dict(sharded.mesh.shape)["tensor"] == 2
    sp = single.tokenizer
    docs = [np.asarray([sp.bos_id()] + sp.encode(t) + [sp.eos_id()]) for t in TEXTS * 3]
    a = eval_lib.score_documents(sharded, docs, batch_size=3)  # rounded up to 4 rows
    b = eval_lib.score_documents(single, docs, batch_size=3)
    # float32 round-off of the mean loss's sums over tokens and vocabulary, which the meshes
    # split differently (support.float32_roundoff).
    terms = b["tokens"] * single.config.vocab_size
    np.testing.assert_allclose(
        a["loss"], b["loss"], rtol=0, atol=float32_roundoff(b["loss"], terms)
    )
    assert a["tokens"] == b["tokens"]


@pytest.mark.parametrize("n_devices", [1, 8])
def test_requests_sharing_a_context_match_transformers(run_dir, hf, n_devices):
    """Requests that share a context compute it once (a KV cache, jaxlm.scorer): one-token and
    longer continuations, a group larger than a batch; beside them requests scored alone (a
    context of its own, contexts cut to fit the run's). Each equals transformers' float64
    log-probability of the whole sequence, cut as the scorer cuts it."""
    if n_devices == 8:
        run = run_lib.load(run_dir, shard_rows=True)
    else:
        run = run_lib.load(run_dir, tensor=1, devices=jax.devices()[:1], shard_rows=True)
    sp, bos = run.tokenizer, run.tokenizer.bos_id()
    add = (bos, *sp.encode("def add(a, b):\n    return a"))
    imports = (bos, *sp.encode("import os\nimport sys\n"))
    long = (bos, *sp.encode(TEXTS[1])[:CONTEXT])  # 65 tokens: any continuation is cut
    lines = ["import json", "def f(x):\n    return x", "class A:", "x = 1", "print(os.sep)"]
    requests = [eval_lib.Request(add, (t,)) for t in sp.encode(" + b - b * b")[:3]]
    requests += [eval_lib.Request(imports, tuple(sp.encode(line))) for line in lines]
    requests += [
        eval_lib.Request((bos, *sp.encode("for i in range(3):")), tuple(sp.encode(" pass"))),
        eval_lib.Request(long, tuple(sp.encode("x = 2"))),
        eval_lib.Request(long, tuple(sp.encode("y"))),
    ]
    plain, shared = scorer.split_by_context(requests, run.max_len)
    assert sorted(shared) == list(range(8)) and sorted(plain) == [8, 9, 10]

    got = eval_lib.score(run, requests, batch_size=4)  # the 5 imports lines span two batches
    for request, scored in zip(requests, got):
        tokens = list(request.context + request.continuation)[-(CONTEXT + 1) :]
        want = reference_logprobs(hf, tokens)[-len(request.continuation) :].sum()
        np.testing.assert_allclose(scored.logprob, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_cli_scores_texts_a_prepared_split_and_choices(run_dir, tmp_path, repo, tokenizer_path):
    from jaxlm.data import prepare

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + "not json\n")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({**item, "answer": 0}) + "\n" for item in ITEMS))
    prepare.main(
        [
            f"--input={texts}",
            f"--output={tmp_path / 'prepared'}",
            f"--tokenizer={tokenizer_path}",
            "--val_fraction=0.5",
        ]
    )

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "jaxlm.eval", f"--from={run_dir}", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = cli(f"--data={texts}", f"--choices={items}", f"--output={tmp_path / 'out.json'}")
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert "skipped 1 x not a JSON object" in done.stdout
    assert f"perplexity {out['documents']['perplexity']:.3f}" in done.stdout
    assert out["documents"]["documents"] == len(TEXTS) and out["choices"]["items"] == len(ITEMS)
    # per item, to diff two runs: each choice's log-likelihood, the pick, the answer; each
    # document's loss and token count
    assert [len(row["logprobs"]) for row in out["choices"]["per_item"]] == [
        len(item["choices"]) for item in ITEMS
    ]
    assert all(row["answer"] == 0 and "pick" in row for row in out["choices"]["per_item"])
    per_document = out["documents"]["per_document"]
    assert sum(d["tokens"] for d in per_document) == out["documents"]["tokens"]
    assert sum(d["loss"] * d["tokens"] for d in per_document) == pytest.approx(
        out["documents"]["loss"] * out["documents"]["tokens"], rel=1e-9
    )
    run = run_lib.load(run_dir, shard_rows=True)
    sp = run.tokenizer
    want = eval_lib.score_documents(
        run, [np.asarray([sp.bos_id()] + sp.encode(t) + [sp.eos_id()]) for t in TEXTS]
    )
    np.testing.assert_allclose(out["documents"]["loss"], want["loss"], rtol=1e-6)

    done = cli(f"--data={tmp_path / 'prepared'}", "--split=validation")
    assert done.returncode == 0, done.stderr
    assert "documents: loss" in done.stdout

    # Bad input: one line naming what to fix, no traceback.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 2}) + "\n")
    for args, message in [
        ((f"--choices={bad}",), f'{bad}:1: "answer" is 2'),
        ((f"--data={tmp_path}/none*.jsonl",), "matches no file"),
        ((), "give --tasks"),
    ]:
        done = cli(*args)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def test_a_missing_data_file_names_the_data_flag(tmp_path):
    """eval reads texts as prepare does, but its flag is --data, not prepare's --input."""
    from jaxlm.errors import EvalError

    with pytest.raises(EvalError, match=r"^--data='.*none\*\.jsonl' matches no file$"):
        eval_lib.read_texts(str(tmp_path / "none*.jsonl"))


def test_scoring_lengths_pad_a_batch_by_under_a_fifth_with_four_shapes_per_doubling():
    lengths = range(1, 2049)
    padded = [scorer.score_length(n, 2048) for n in lengths]
    assert all(p >= n for n, p in zip(lengths, padded))
    assert max((p - n) / p for n, p in zip(lengths, padded) if n > 16) < 0.2
    assert sorted(set(p for n, p in zip(lengths, padded) if 256 < n <= 512)) == [320, 384, 448, 512]
    assert scorer.score_length(108, 100) == 100  # never past the context
