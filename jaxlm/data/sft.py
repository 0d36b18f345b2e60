"""Chat and prompt/completion records -> tokens and a loss mask, through a chat template.

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` or
`{"prompt": str, "completion": str}` (one user and one assistant turn). A template is a small
function that lays a conversation out as segments: text, or a special token, each trained or
not. The mask is 1 on exactly the assistant text and its end-of-turn token, 0 on system and
user turns and on the template's scaffolding (headers, [INST], newlines between turns).

Segments are tokenized one at a time and concatenated, so a mask bit never depends on where a
tokenizer would have merged across a boundary. Text right after a special token (or at the
start) is encoded as a tokenizer encodes the start of a text: sentencepiece adds its dummy-
prefix space there, as Meta's Llama 2 code and Hugging Face's legacy Llama tokenizer do; text
after text is encoded as a continuation (no added space). Text does not become a special
token: a user who writes "<|eot_id|>" gets those characters, not the end of the turn (a
tokenizer.json is told so; sentencepiece never reads control tokens from text).

Special tokens: `bos` / `eos` are the tokenizer's own (llama2, plain); llama3 and chatml name
theirs (<|eot_id|>, <|im_end|>, ...) and need a tokenizer that has each as one token. A
tokenizer without them is an error naming data.chat_template, not text: an end of turn spelt
as several text tokens is one a model cannot be stopped on.

Turns after the last assistant turn train nothing and are dropped; a conversation without an
assistant turn is a bad record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxlm.data.documents import TOKEN_DTYPE
from jaxlm.errors import BadRecord

ROLES = ("system", "user", "assistant")
OVERFLOW_POLICIES = ("drop", "truncate_left")
BOS, EOS = "bos", "eos"  # the tokenizer's own begin / end of sequence


@dataclasses.dataclass(frozen=True)
class Special:
    """A special token by name: BOS, EOS, or the token's text (e.g. "<|eot_id|>")."""

    name: str


def messages_of(record) -> list[dict]:
    """The record's turns, up to its last assistant turn; BadRecord if it has none usable."""
    if not isinstance(record, dict):
        raise BadRecord("no_messages")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        raise BadRecord("no_messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("no_messages")
    for m in messages:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise BadRecord("bad_message")
        if m["role"] not in ROLES:
            raise BadRecord("unknown_role")
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord("empty_assistant")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRecord("no_assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]


# --- the templates: conversation -> [(segment, trained)] ----------------------------------


def llama2(messages: list[dict]) -> list[tuple]:
    """Llama 2 chat: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`
    per exchange (Meta's llama/generation.py; Hugging Face's template for Llama-2-chat)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    segments = []
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord("turn_order")  # llama2 alternates user / assistant
        if m["role"] == "user":
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            segments += [(Special(BOS), False), (f"[INST] {content.strip()} [/INST]", False)]
        else:
            segments += [(f" {m['content'].strip()} ", True), (Special(EOS), True)]
    return segments


def llama3(messages: list[dict]) -> list[tuple]:
    """Llama 3 instruct: `<|begin_of_text|>` then per turn
    `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content, stripped}<|eot_id|>`."""
    segments = [(Special("<|begin_of_text|>"), False)]
    for m in messages:
        trained = m["role"] == "assistant"
        segments += [
            (Special("<|start_header_id|>"), False),
            (m["role"], False),
            (Special("<|end_header_id|>"), False),
            ("\n\n", False),
            (m["content"].strip(), trained),
            (Special("<|eot_id|>"), trained),
        ]
    return segments


def chatml(messages: list[dict]) -> list[tuple]:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn (no bos)."""
    segments = []
    for m in messages:
        trained = m["role"] == "assistant"
        segments += [
            (Special("<|im_start|>"), False),
            (f"{m['role']}\n", False),
            (m["content"], trained),
            (Special("<|im_end|>"), trained),
            ("\n", False),
        ]
    return segments[:-1]  # nothing after the last turn's end (it would train nothing)


def plain(messages: list[dict]) -> list[tuple]:
    """No scaffolding: bos, then each turn's content as it is (put any separator in the data),
    eos after each assistant turn. For base models and prompt/completion data."""
    segments = [(Special(BOS), False)]
    for m in messages:
        trained = m["role"] == "assistant"
        segments.append((m["content"], trained))
        if trained:
            segments.append((Special(EOS), True))
    return segments


TEMPLATES: dict[str, Callable[[list[dict]], list[tuple]]] = {
    "llama2": llama2,
    "llama3": llama3,
    "chatml": chatml,
    "plain": plain,
}
SPECIALS = {
    "llama2": (BOS, EOS),
    "plain": (BOS, EOS),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


# --- tokenizing segments --------------------------------------------------------------------


class Encoder:
    """Token ids of a template's segments for one tokenizer (sentencepiece or tokenizer.json).

    Building it checks the template's special tokens exist; the error names `field`."""

    def __init__(self, tokenizer, template: str, field: str = "data.chat_template"):
        if template not in TEMPLATES:
            raise ValueError(f"{field}={template!r}: use one of {', '.join(TEMPLATES)}")
        self.template = TEMPLATES[template]
        self.ids = {}
        for name in SPECIALS[template]:
            token = self._special_id(tokenizer, name)
            if token is None or token < 0:
                raise ValueError(
                    f"{field}={template!r} needs the special token {name!r}, which the tokenizer "
                    f"does not have as one token; use a tokenizer that has it (the model's own: "
                    f"Llama 3's tokenizer.json for llama3, a ChatML one for chatml), or "
                    f"{field}='llama2' or 'plain', which use the tokenizer's bos / eos"
                )
            self.ids[name] = int(token)
        self._start, self._continue = self._text_encoders(tokenizer)

    @staticmethod
    def _special_id(tokenizer, name: str) -> int | None:
        if name == BOS:
            return tokenizer.bos_id()
        if name == EOS:
            return tokenizer.eos_id()
        if hasattr(tokenizer, "token_id"):  # JsonTokenizer
            return tokenizer.token_id(name)
        token = tokenizer.piece_to_id(name)
        return None if token == tokenizer.unk_id() else token

    @staticmethod
    def _text_encoders(tokenizer):
        """(encode text at a start, encode text continuing text), special tokens as text."""
        if hasattr(tokenizer, "plain_text_encoder"):  # JsonTokenizer: no added prefix
            encode = tokenizer.plain_text_encoder()
            return encode, encode
        from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tokenizer.serialized_model_proto())
        if not proto.normalizer_spec.add_dummy_prefix:
            return tokenizer.encode, tokenizer.encode
        proto.normalizer_spec.add_dummy_prefix = False  # continuing text: no space added
        continuing = SentencePieceProcessor(model_proto=proto.SerializeToString())
        return tokenizer.encode, continuing.encode

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of a conversation from messages_of(): int32, mask 0/1."""
        tokens, mask, after_text = [], [], False
        for segment, trained in self.template(messages):
            if isinstance(segment, Special):
                ids, after_text = [self.ids[segment.name]], False
            elif segment:
                ids = (self._continue if after_text else self._start)(segment)
                after_text = True
            else:
                continue
            tokens += ids
            mask += [int(trained)] * len(ids)
        return np.asarray(tokens, TOKEN_DTYPE), np.asarray(mask, TOKEN_DTYPE)


def record_of(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How a prepared SFT document is stored: [2, n] int32, tokens then mask."""
    return np.stack([tokens, mask]).astype(TOKEN_DTYPE)


def text_of(messages: list[dict]) -> str:
    """The conversation's words, for training a tokenizer on SFT data and for the split hash."""
    return "\n".join(m["content"] for m in messages)
