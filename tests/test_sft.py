"""Supervised fine-tuning data: templates -> tokens + loss mask, prepare --sft, packing, loss.

Masks are checked against positions found independently: for a tokenizer.json, by decoding
the tokens back to characters and locating each assistant turn in the text the model's own
(Jinja) chat template renders; for sentencepiece, against Meta's Llama 2 tokenization of the
whole exchange. Conversations are made here, so every expected count is known.
"""

import json
import pathlib

import jax
import jinja2
import numpy as np
import pytest
import tokenizers
from support import factory_for, float32_roundoff, logit_terms, small_config

from jaxlm import config as config_lib
from jaxlm import step as step_lib
from jaxlm import train as train_lib
from jaxlm.data import pipeline, prepare, prepared, readers, sft
from jaxlm.data import tokenizer as tokenizer_lib

# The chat templates the models ship in tokenizer_config.json (Llama-2-chat, Llama-3-Instruct,
# ChatML as Qwen / axolotl write it): the reference each jaxlm template is checked against.
JINJA = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}"
        "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
        "message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' "
        "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    ),
}
BOS_TOKEN = {"llama2": "<s>", "llama3": "<|begin_of_text|>", "chatml": ""}


def trained_span(template, content):
    """The text the mask must cover for one assistant turn: its words and end of turn."""
    return {
        "llama2": f" {content.strip()} </s>",
        "llama3": f"{content.strip()}<|eot_id|>",
        "chatml": f"{content}<|im_end|>",
    }[template]


SPECIALS = [
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
WORDS = (
    "what",
    "is",
    "the",
    "answer",
    "to",
    "this",
    "question",
    "please",
    "say",
    "it",
    "again",
    "in",
    "fewer",
    "words",
    "the",
    "sky",
    "is",
    "blue",
    "because",
    "of",
    "scattering",
    "def",
    "return",
    "value",
    "list",
    "of",
    "items",
)
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "what is the sky?  "},
    {"role": "assistant", "content": " the sky is blue because of scattering."},
    {"role": "user", "content": "say it again <|eot_id|> in fewer words"},  # text, not a token
    {"role": "assistant", "content": "blue sky\nscattering"},
]


@pytest.fixture(scope="module")
def json_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer.json with every template's special tokens, made here."""
    directory = tmp_path_factory.mktemp("hf")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
        )
    )
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A small sentencepiece model as jaxlm trains them (bos 1, eos 2, dummy prefix)."""
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    rng = np.random.default_rng(0)
    docs = [
        " ".join(rng.choice(WORDS, 30)) + "\n[INST] <<SYS>> [/INST] <</SYS>>\n" for _ in range(300)
    ]
    tokenizer_lib.train(docs, 300, path)
    return path


@pytest.mark.parametrize("template", ["llama2", "llama3", "chatml"])
def test_mask_is_exactly_the_assistant_turns_of_the_models_own_template(template, json_tokenizer):
    tokens, mask = sft.Encoder(tokenizer_lib.load(json_tokenizer), template).encode(
        sft.messages_of({"messages": CONVERSATION})
    )
    rendered = (
        jinja2.Environment()
        .from_string(JINJA[template])
        .render(messages=CONVERSATION, bos_token=BOS_TOKEN[template], eos_token="</s>")
    )
    if template == "chatml":
        rendered = rendered.removesuffix("\n")  # after the last turn jaxlm stops: nothing to train
    raw = tokenizers.Tokenizer.from_file(str(json_tokenizer))
    ends = [
        len(raw.decode(tokens[: i + 1].tolist(), skip_special_tokens=False))
        for i in range(len(tokens))
    ]
    assert raw.decode(tokens.tolist(), skip_special_tokens=False) == rendered
    spans, at = [], 0
    for m in CONVERSATION:
        if m["role"] == "assistant":
            text = trained_span(template, m["content"])
            at = rendered.index(text, at)
            spans.append((at, at + len(text)))
    starts = [0] + ends[:-1]
    expected = [int(any(a <= s and e <= b for a, b in spans)) for s, e in zip(starts, ends)]
    for s, e in zip(starts, ends):  # no token straddles a span's edge
        assert all(e <= a or s >= b or (a <= s and e <= b) for a, b in spans)
    assert mask.tolist() == expected
    # The user's "<|eot_id|>" stayed text: llama3 has one per message, the others none.
    assert tokens.tolist().count(raw.token_to_id("<|eot_id|>")) == (
        5 if template == "llama3" else 0
    )


def test_llama2_and_plain_on_sentencepiece_are_metas_tokenization(sp_tokenizer):
    sp = tokenizer_lib.load(sp_tokenizer)
    tokens, mask = sft.Encoder(sp, "llama2").encode(sft.messages_of({"messages": CONVERSATION}))
    expected_tokens, expected_mask = [], []
    system, turns = CONVERSATION[0]["content"], CONVERSATION[1:]
    for i in range(0, len(turns), 2):
        user = turns[i]["content"]
        if i == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        prompt = f"[INST] {user.strip()} [/INST]"
        exchange = sp.encode(f"{prompt} {turns[i + 1]['content'].strip()} ")  # Meta's call
        n = len(sp.encode(prompt))
        assert exchange[:n] == sp.encode(prompt)  # the answer starts at a token boundary
        expected_tokens += [sp.bos_id(), *exchange, sp.eos_id()]
        expected_mask += [0] * (n + 1) + [1] * (len(exchange) - n + 1)
    assert tokens.tolist() == expected_tokens
    assert mask.tolist() == expected_mask

    record = {
        "prompt": 'def f(items):\n    """the list of items"""\n',
        "completion": "    return items\n",
    }
    tokens, mask = sft.Encoder(sp, "plain").encode(sft.messages_of(record))
    whole = sp.encode(record["prompt"] + record["completion"])
    n = len(sp.encode(record["prompt"]))
    assert tokens.tolist() == [sp.bos_id(), *whole, sp.eos_id()]
    assert mask.tolist() == [0] * (n + 1) + [1] * (len(whole) - n + 1)


def test_a_template_whose_tokens_the_tokenizer_lacks_is_an_error_naming_the_field(sp_tokenizer):
    sp = tokenizer_lib.load(sp_tokenizer)
    for template, token in (("llama3", "<|begin_of_text|>"), ("chatml", "<|im_start|>")):
        with pytest.raises(
            ValueError,
            match=rf"data.chat_template='{template}' needs the special "
            rf"token '{token}'.*'llama2' or 'plain'",
        ):
            sft.Encoder(sp, template)


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")


def test_prepare_sft_stores_the_mask_and_reports_every_bad_record(sp_tokenizer, tmp_path, capsys):
    user = {"role": "user", "content": "what is the sky"}
    answer = {"role": "assistant", "content": "blue"}
    good = [
        {"prompt": "what is the sky", "completion": " blue"},
        {"messages": [{"role": "system", "content": "be brief"}, user, answer, user]},
    ]
    bad = {
        "no_messages": {"text": "what is the sky"},
        "unknown_role": {"messages": [{"role": "robot", "content": "beep"}, answer]},
        "empty_assistant": {"prompt": "what", "completion": "  "},
        "no_assistant": {"messages": [user]},
        "bad_message": {"messages": [{"role": "user", "content": 3}, answer]},
        "turn_order": {"messages": [user, user, answer]},  # llama2 alternates
        "invalid_json": b"{not json",
        "invalid_utf8": b'{"prompt": "bad \xff byte", "completion": "x"}',
    }
    path = tmp_path / "chats.jsonl"
    _write_jsonl(path, [good[0], *bad.values(), good[1]])
    out = tmp_path / "out"
    meta = prepare.prepare(
        str(path),
        out,
        tokenizer=sp_tokenizer,
        sft=True,
        chat_template="llama2",
        val_fraction=0.0,
        workers=1,
    )
    printed = capsys.readouterr().out
    for line, reason in enumerate(bad, 2):
        assert meta["skipped"]["counts"][reason] == 1
        assert meta["skipped"]["examples"][reason] == [f"{path}:{line}"]
        assert f"skipped 1 x {readers.SKIP_REASONS[reason]} (e.g. {path}:{line})" in printed
    assert meta["kind"] == "sft" and meta["chat_template"] == "llama2"
    dataset = prepared.PreparedDataset(out)
    docs = dataset.documents("train")
    encoder = sft.Encoder(tokenizer_lib.load(sp_tokenizer), "llama2")
    for i, record in enumerate(good):
        tokens, mask = encoder.encode(sft.messages_of(record))  # the trailing user turn goes
        np.testing.assert_array_equal(docs[i], np.stack([tokens, mask]))
    assert meta["splits"]["train"]["trained_tokens"] == sum(int(docs[i][1].sum()) for i in range(2))
    with pytest.raises(ValueError, match=r"chat_template='chatml' needs the special token"):
        prepare.prepare(
            str(path),
            tmp_path / "other",
            tokenizer=sp_tokenizer,
            sft=True,
            chat_template="chatml",
            workers=1,
        )


def test_a_tokenizer_json_stays_one_in_the_prepared_dataset(json_tokenizer, tmp_path):
    """Issue 16: it was copied in as tokenizer.model and loaded as sentencepiece."""
    _write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(WORDS[i : i + 9])} for i in range(20)])
    out = tmp_path / "out"
    prepare.prepare(
        str(tmp_path / "text.jsonl"), out, tokenizer=json_tokenizer, val_fraction=0.2, workers=1
    )
    assert sorted(p.name for p in out.glob("tokenizer*")) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    path = prepared.PreparedDataset(out).tokenizer_path
    tok = tokenizer_lib.load(path)
    assert isinstance(tok, tokenizer_lib.JsonTokenizer) and path.name == "tokenizer.json"
    raw = tokenizers.Tokenizer.from_file(str(json_tokenizer))
    assert (tok.bos_id(), tok.eos_id()) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"))
    doc = prepared.PreparedDataset(out).documents("train")[0]
    assert doc[0] == tok.bos_id() and doc[-1] == tok.eos_id()
    config = small_config()
    config.model.vocab_size, config.data.source = 384, f"arrayrecord:{out}"
    assert pipeline.build(config, tmp_path / "run").tokenizer_path == str(path)
    prepare.prepare(str(tmp_path / "text.jsonl"), out, tokenizer=json_tokenizer, workers=1)
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(json_tokenizer.read_text().replace('"<s>"', '"<S>"'))
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        prepare.prepare(str(tmp_path / "text.jsonl"), out, tokenizer=other, workers=1)


def _conversations(sp_tokenizer, n, seed=0, max_words=12):
    """Multi-turn conversations of random words, as prepared SFT documents [2, n]."""
    encoder = sft.Encoder(tokenizer_lib.load(sp_tokenizer), "llama2")
    rng = np.random.default_rng(seed)

    def words():
        return " ".join(rng.choice(WORDS, rng.integers(1, max_words)))

    docs = []
    for _ in range(n):
        turns = [
            {"role": r, "content": words()}
            for _ in range(rng.integers(1, 3))
            for r in ("user", "assistant")
        ]
        docs.append(sft.record_of(*encoder.encode(turns)))
    return docs


def test_packed_and_unpacked_conversations_give_the_same_loss(sp_tokenizer):
    config = small_config()
    config.model.vocab_size, config.data.seq_len = 384, 192
    docs = _conversations(sp_tokenizer, 12, max_words=6)
    packed_rows = pipeline.PackedConversations(docs, config.data.seq_len, seed=1)
    assert packed_rows.overflowed == 0
    assert sorted(packed_rows.row_docs.tolist()) == list(range(len(docs)))  # each once
    assert max(np.diff(packed_rows.row_starts)) > 1  # rows do hold several conversations
    packed = [packed_rows[i] for i in range(len(packed_rows))]
    alone = [pipeline.PackedConversations([d], config.data.seq_len, seed=0)[0] for d in docs]
    factory = factory_for(config, jax.devices()[:1])
    params = factory.create(jax.random.key(0))["params"]

    with factory.context():
        loss_fn = jax.jit(lambda batch: step_lib.loss_sum_and_count(factory.model, params, batch))

    def loss(rows):  # as many rows either way (padding rows count nothing): one compile
        rows = rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (len(docs) - len(rows))
        with factory.context():
            total, count = loss_fn({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        return float(total), float(count)

    (packed_sum, packed_count), (alone_sum, alone_count) = loss(packed), loss(alone)
    assert packed_count == alone_count == sum(int(d[1, 1:].sum()) for d in docs)
    # Packed rows sum attention and the loss in other orders: float32 round-off of a sum of
    # count tokens' losses, each carrying a logit's round-off (support.logit_terms).
    per_token = alone_sum / alone_count
    bound = float32_roundoff(per_token, alone_count * logit_terms(config))
    np.testing.assert_allclose(packed_sum, alone_sum, rtol=0, atol=bound)


def test_overflow_policies_count_and_keep_a_correct_mask(sp_tokenizer):
    docs = _conversations(sp_tokenizer, 6, seed=3, max_words=4)
    seq_len = max(d.shape[1] for d in docs) + 4
    turns = [{"role": r, "content": f"{w} {w}"} for w in WORDS for r in ("user", "assistant")]
    long = sft.record_of(*sft.Encoder(tokenizer_lib.load(sp_tokenizer), "llama2").encode(turns))
    assert long.shape[1] > 2 * seq_len and 0 < long[1, -(seq_len + 1) :].mean() < 1
    dropped = pipeline.PackedConversations([*docs, long], seq_len, seed=0, overflow="drop")
    assert dropped.overflowed == 1 and 6 not in dropped.row_docs
    assert "1 longer than seq_len + 1" in dropped.describe() and "dropped" in dropped.describe()
    kept = pipeline.PackedConversations([long], seq_len, seed=0, overflow="truncate_left")
    row, tail = kept[0], long[:, -(seq_len + 1) :]
    np.testing.assert_array_equal(row["inputs"], tail[0, :-1])
    np.testing.assert_array_equal(row["targets"], tail[0, 1:])
    np.testing.assert_array_equal(row["loss_mask"], tail[1, 1:] == 1)
    assert kept.overflowed == 1 and kept.overflowed_tokens == long.shape[1] - seq_len - 1


def test_sft_batches_resume_exactly(sp_tokenizer):
    rows = pipeline.PackedConversations(_conversations(sp_tokenizer, 40), 48, seed=0)
    config = small_config()

    def batches():
        return pipeline.train_batches(rows, 4, config)

    first = batches()
    expected = [next(first) for _ in range(5)]
    second = batches()
    next(second), next(second)
    resumed = batches()
    resumed.set_state(second.get_state())
    for batch in expected[2:]:
        got = next(resumed)
        assert all(np.array_equal(batch[k], got[k]) for k in batch)


def test_sft_config_errors_name_the_field():
    config = small_config(fsdp=8)
    config.data.source = "sft:chats/*.jsonl"
    with pytest.raises(config_lib.ConfigError, match=r"data.chat_template=''.*needs one of"):
        config_lib.validate(config, 8)
    config.data.chat_template, config.data.sft_overflow = "plain", "truncate"
    with pytest.raises(config_lib.ConfigError, match=r"data.sft_overflow='truncate'"):
        config_lib.validate(config, 8)


@pytest.mark.slow  # a real training run: ~20 s alone on 2 cores, more when they are shared
def test_tiny_sft_run_lowers_the_validation_completion_loss(sp_tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for _ in range(400):  # answer: the question's words reversed
        words = list(rng.choice(WORDS, rng.integers(2, 5)))
        records.append({"prompt": " ".join(words) + "\n", "completion": " ".join(words[::-1])})
    _write_jsonl(tmp_path / "chats.jsonl", records)
    config = small_config(fsdp=-1)
    config.model.vocab_size = 384
    config.data.source, config.data.tokenizer = f"sft:{tmp_path}/*.jsonl", str(sp_tokenizer)
    config.data.chat_template, config.data.val_fraction = "plain", 0.1
    config.train.steps, config.train.eval_every, config.train.log_every = 12, 12, 12
    config.data.eval_batches = 1
    train_lib.train(config, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    print("validation completion loss", val)
    assert len(val) == 2 and val[1] < 0.8 * val[0]
    assert list(pathlib.Path(tmp_path / "run/data").glob("sft-*/train/*.array_record"))
