"""Tokenizers: load a sentencepiece `.model` (Llama 2's, or one jaxlm trained) or a Hugging
Face `tokenizer.json` (Llama 3's); train a sentencepiece one on documents.

jaxlm calls a tokenizer through sentencepiece's methods (encode, bos_id, eos_id, pad_id,
vocab_size, decode), so a `tokenizer.json` is wrapped to answer the same calls. Files are
read and written through etils.epath: a local path or gs://.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

import sentencepiece as spm
from etils import epath

from jaxlm import files

# Ids follow LLaMA's tokenizer (unk 0, bos 1, eos 2); trained ones add pad at 3.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    byte_fallback=True,  # no unknown tokens: unseen bytes become byte pieces
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=["\n"],  # lines are sentences for training, so teach it newlines
    input_sentence_size=300_000,
    shuffle_input_sentence=True,
    max_sentence_length=8192,
    minloglevel=2,
)


class JsonTokenizer:
    """A Hugging Face `tokenizer.json`, answering the sentencepiece calls jaxlm makes.

    Its bos and eos tokens are those the `tokenizer_config.json` beside it names (how Hugging
    Face stores them); without one, -1 (none), as sentencepiece says for a missing id.
    """

    def __init__(self, path: epath.Path):
        import tokenizers

        self.path = path
        self._tokenizer = tokenizers.Tokenizer.from_str(path.read_text())
        config = path.parent / "tokenizer_config.json"
        special = json.loads(config.read_text()) if config.is_file() else {}
        self._ids = {
            name: self._token_id(special.get(f"{name}_token"))
            for name in ("bos", "eos", "pad", "unk")
        }

    def _token_id(self, token) -> int:
        if isinstance(token, dict):  # {"content": "<|begin_of_text|>", ...}
            token = token.get("content")
        found = self._tokenizer.token_to_id(token) if token else None
        return -1 if found is None else found

    def bos_id(self) -> int:
        return self._ids["bos"]

    def eos_id(self) -> int:
        return self._ids["eos"]

    def pad_id(self) -> int:
        return self._ids["pad"]

    def unk_id(self) -> int:
        return self._ids["unk"]

    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of a token by its text (e.g. "<|eot_id|>"), None if it is not one token."""
        return self._tokenizer.token_to_id(token)

    def plain_text_encoder(self):
        """encode(text) -> ids where special tokens' text stays text: for chat content, in
        which "<|eot_id|>" typed by a user must not end the turn (jaxlm.data.sft)."""
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
        tokenizer.encode_special_tokens = True
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, texts, num_threads: int | None = None):
        """Ids of one text, or a list of id lists; no special tokens (callers add bos/eos)."""
        if isinstance(texts, str):
            return self._tokenizer.encode(texts, add_special_tokens=False).ids
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids))


def load(path: epath.PathLike, field: str = "config.data.tokenizer"):
    """A sentencepiece processor for a `.model` file; a JsonTokenizer for a `.json` one."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{field}={str(path)!r}: no such tokenizer file (a sentencepiece "
            ".model or a Hugging Face tokenizer.json)"
        )
    if path.suffix == ".json":
        try:
            return JsonTokenizer(path)
        except Exception as e:  # tokenizers raises its own Exception type on a bad file
            raise ValueError(
                f"{field}={str(path)!r} is not a Hugging Face tokenizer.json: {e}"
            ) from e
    try:
        return spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{field}={str(path)!r} is not a sentencepiece model: {e}") from e


def train(
    documents: Iterable[str], vocab_size: int, output: epath.PathLike, seed: int = 0
) -> spm.SentencePieceProcessor:
    """Train a BPE tokenizer on the non-blank lines of `documents`; write it to `output`."""
    spm.set_random_generator_seed(seed)
    lines = (line for doc in documents for line in doc.splitlines() if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        vocab_size=vocab_size,
        num_threads=2,
        **TRAINER_OPTIONS,
    )
    output = epath.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(output, model.getvalue())  # never leave half a model behind
    return spm.SentencePieceProcessor(model_proto=model.getvalue())
