"""A prepare run's unit of work: one piece of the input, tokenized into its shards.

A piece is an input file, or a range of records of a TFDS split. A worker process
(`init_worker` loads the tokenizer once) reads the piece's documents, skipping and counting
the unusable ones, tokenizes them (or lays out SFT conversations with their loss mask), sends
each to the train or the validation shard by a hash of its text, and writes a marker last:
the record `python -m jaxlm.data.prepare` resumes from (`finished`).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import zlib
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from jaxlm.data import prepared, readers, sft, tfds_source
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.documents import TOKEN_DTYPE

if TYPE_CHECKING:
    from jaxlm.data.prepare import Settings

ENCODE_BATCH = 256


def is_validation(text: str, val_fraction: float) -> bool:
    return zlib.crc32(text.encode("utf-8", "replace")) % 1_000_000 < val_fraction * 1_000_000


def list_pieces(inputs: list[str], records_per_piece: int) -> list[dict]:
    """One piece per file; TFDS splits in ranges. `split` None means: split by hash."""
    pieces, patterns = [], []
    for spec in inputs:
        if spec.startswith(tfds_source.PREFIX):
            name = spec.removeprefix(tfds_source.PREFIX)
            names = tfds_source.splits(name)
            for split in ("train", "validation"):
                tfds_split = split if split in names else None
                if tfds_split is None:
                    continue  # no validation split: train is split by hash below
                n = len(tfds_source.open_split(name, tfds_split))
                for start in range(0, n, records_per_piece):
                    pieces.append(
                        {
                            "tfds": name,
                            "tfds_split": tfds_split,
                            "start": start,
                            "stop": min(n, start + records_per_piece),
                            "split": split if "validation" in names else None,
                        }
                    )
        else:
            patterns.append(spec)
    for path in readers.expand(patterns) if patterns else []:
        stat = os.stat(path)
        pieces.append(
            {
                "file": os.path.abspath(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "split": None,
            }
        )
    return pieces


def read_conversations(
    path: str, max_chars: int, skipped: readers.Skipped, input_format: str = "auto"
):
    """(messages, where) for each usable SFT record of a JSONL file; the rest to `skipped`."""
    if readers.format_of(path, input_format) != "jsonl":
        raise ValueError(f"{path}: SFT records are read from .jsonl files (optionally .gz/.zst)")
    for record, where in readers.json_records(path, skipped):
        try:
            messages = sft.messages_of(record)
        except sft.BadRecord as e:
            skipped.add(e.reason, where)
            continue
        if len(sft.text_of(messages)) > max_chars:
            skipped.add("too_long", where)
            continue
        yield messages, where


def read_piece(piece: dict, args: Settings, skipped: readers.Skipped):
    """(text, where) for each usable document of the piece; (messages, where) with sft."""
    if "file" in piece and args.sft:
        yield from read_conversations(
            piece["file"], args.max_document_chars, skipped, args.input_format
        )
        return
    if "file" in piece:
        yield from readers.read(
            piece["file"],
            args.text_key,
            args.txt_mode,
            args.max_document_chars,
            skipped,
            args.input_format,
        )
        return
    source = tfds_source.open_split(piece["tfds"], piece["tfds_split"])
    for i in range(piece["start"], piece["stop"]):
        where = f"tfds:{piece['tfds']}/{piece['tfds_split']}[{i}]"
        try:
            text = tfds_source.text_of(source[i], args.text_key)
        except UnicodeDecodeError:
            skipped.add("invalid_utf8", where)
            continue
        if text is None:
            skipped.add("missing_key", where)
        elif not text.strip():
            skipped.add("empty_document", where)
        elif len(text) > args.max_document_chars:
            skipped.add("too_long", where)
        else:
            yield text, where


class _ShardWriter:
    """One split's shard of a piece: written under a temporary name, renamed when done."""

    def __init__(self, root: epath.Path, split: str, index: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = prepared.shard_path(root, split, index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.writer = ArrayRecordWriter(os.fspath(self.tmp), "group_size:1")  # cheap random reads
        self.lengths_path = prepared.lengths_path(root, split, index)
        self.lengths: list[int] = []
        self.trained = 0  # SFT: tokens the loss mask keeps

    def write(self, record: np.ndarray) -> None:
        """A document's tokens, or an SFT record [2, n] (tokens, mask)."""
        self.writer.write(record.tobytes())
        self.lengths.append(record.shape[-1])
        if record.ndim == 2:
            self.trained += int(record[1].sum())

    def finish(self) -> None:
        self.writer.close()
        self.tmp.replace(self.path)
        tmp = self.lengths_path.with_name(self.lengths_path.name + ".tmp.npy")
        with tmp.open("wb") as f:
            np.save(f, np.asarray(self.lengths, np.int32))
        tmp.replace(self.lengths_path)


_sp = None  # the worker's tokenizer, loaded once per process
_encoder = None  # with sft: the chat template's encoder for it


def init_worker(tokenizer_path: str, chat_template: str) -> None:
    global _sp, _encoder
    _sp = tokenizer_lib.load(tokenizer_path)
    _encoder = sft.Encoder(_sp, chat_template, "chat_template") if chat_template else None


def piece_options(args: Settings, tokenizer_path) -> dict:
    """Everything besides the input that decides a piece's output (checked on resume)."""
    options = {
        "text_key": args.text_key,
        "txt_mode": args.txt_mode,
        "val_fraction": args.val_fraction,
        "max_document_chars": args.max_document_chars,
        "tokenizer_sha256": prepared.file_sha256(tokenizer_path),
    }
    if args.sft:
        options["chat_template"] = args.chat_template
    if args.input_format != "auto":  # only then: earlier runs' markers stay valid
        options["input_format"] = args.input_format
    return options


def _records(piece: dict, args: Settings, skipped: readers.Skipped):
    """(record to store, text its split is hashed from) for each usable document."""
    documents = read_piece(piece, args, skipped)
    if args.sft:
        for messages, where in documents:
            try:
                tokens, mask = _encoder.encode(messages)
            except sft.BadRecord as e:
                skipped.add(e.reason, where)
                continue
            yield sft.record_of(tokens, mask), sft.text_of(messages)
        return
    bos, eos = _sp.bos_id(), _sp.eos_id()
    prefix, suffix = [bos] if bos >= 0 else [], [eos] if eos >= 0 else []
    while batch := list(itertools.islice(documents, ENCODE_BATCH)):
        texts = [text for text, _ in batch]
        for text, ids in zip(texts, _sp.encode(texts)):
            yield np.asarray(prefix + ids + suffix, TOKEN_DTYPE), text


def prepare_piece(job: tuple[int, dict, dict, Settings]) -> dict:
    """Tokenize one piece into its shards, then write its marker (the resume record)."""
    index, piece, options, args = job
    root = epath.Path(args.output)
    start = time.perf_counter()
    skipped = readers.Skipped()
    writers = {split: _ShardWriter(root, split, index) for split in prepared.SPLITS}
    for record, text in _records(piece, args, skipped):
        split = piece["split"] or (
            "validation" if is_validation(text, args.val_fraction) else "train"
        )
        writers[split].write(record)
    for writer in writers.values():
        writer.finish()
    result = {
        "index": index,
        "piece": piece,
        "options": options,
        "documents": {s: len(w.lengths) for s, w in writers.items()},
        "tokens": {s: int(sum(w.lengths)) for s, w in writers.items()},
        "skipped": skipped.to_json(),
        "seconds": time.perf_counter() - start,
    }
    if args.sft:
        result["trained_tokens"] = {s: w.trained for s, w in writers.items()}
    prepared.write_json_atomic(prepared.piece_marker(root, index), result)
    return result


def finished(root: epath.Path, index: int, piece: dict, options: dict) -> dict | None:
    """The piece's marker if it was finished from the same input and options, else None."""
    marker = prepared.piece_marker(root, index)
    if not marker.is_file():
        return None
    result = json.loads(marker.read_text())
    return result if (result["piece"], result["options"]) == (piece, options) else None
