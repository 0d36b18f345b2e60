"""Sentencepiece tokenizers: load a `.model` file, or train one on documents."""

from __future__ import annotations

import io
import pathlib
from typing import Iterable

import sentencepiece as spm

# Ids follow LLaMA's tokenizer (unk 0, bos 1, eos 2); trained ones add pad at 3.
TRAINER_OPTIONS = dict(
    model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    byte_fallback=True,  # no unknown tokens: unseen bytes become byte pieces
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True, split_digits=True,
    user_defined_symbols=["\n"],  # lines are sentences for training, so teach it newlines
    input_sentence_size=300_000, shuffle_input_sentence=True, max_sentence_length=8192,
    minloglevel=2,
)


def load(path: str | pathlib.Path, field: str = "config.data.tokenizer") -> spm.SentencePieceProcessor:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such sentencepiece model file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{field}={str(path)!r} is not a sentencepiece model: {e}") from e


def train(documents: Iterable[str], vocab_size: int, output: str | pathlib.Path,
          seed: int = 0) -> spm.SentencePieceProcessor:
    """Train a BPE tokenizer on the non-blank lines of `documents`; write it to `output`."""
    spm.set_random_generator_seed(seed)
    lines = (line for doc in documents for line in doc.splitlines() if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model,
                                   vocab_size=vocab_size, num_threads=2, **TRAINER_OPTIONS)
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(output)  # never leave a half-written model behind
    return spm.SentencePieceProcessor(model_proto=model.getvalue())
