"""Tokenize a corpus into ArrayRecord shards that training reads by index.

    python -m jaxlm.data.prepare --input='corpus/*.jsonl' --text_key=text \
        --output=data/mycorpus --tokenizer=path/to/tokenizer.model
    python -m jaxlm.data.prepare --input='books/*.txt.gz' --txt_mode=blank_line \
        --output=data/books --train_tokenizer --vocab_size=32000
    python -m jaxlm.data.prepare --input=tfds:lm1b --output=data/lm1b --tokenizer=...
    python -m jaxlm.data.prepare --sft --chat_template=llama3 --input='chats/*.jsonl.zst' \
        --output=data/chats --tokenizer=runs/llama3/tokenizer.json

Each input file (or each range of a TFDS split) is a piece, tokenized by a worker
process into a train and a validation shard; a document is held out when a hash of its
text says so, so the split does not depend on file order or worker count. Finished
pieces are marked, so running the same command again after an interruption only does
what is left. Unusable documents are skipped and counted, with where they were.

With --sft the inputs are chat / prompt-completion JSONL records (jaxlm.data.sft): each is
laid out by --chat_template and stored as its tokens and loss mask.

`prepare(inputs, output, tokenizer=..., ...)` is the same as a function; the CLI is a thin
layer over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import sys
import time
import zlib

import numpy as np
import tqdm
from etils import epath

from jaxlm.data import prepared, readers, sft, tfds_source
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.documents import TOKEN_DTYPE

ENCODE_BATCH = 256
# Files a tokenizer.json needs beside it (its bos / eos are named in tokenizer_config.json).
HF_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one prepare run is asked to do (see prepare() for each field)."""

    inputs: tuple[str, ...]
    output: str
    tokenizer: str | None = None
    train_tokenizer: bool = False
    vocab_size: int = 32000
    tokenizer_sample_chars: int = 100_000_000
    text_key: str = "text"
    txt_mode: str = "file"
    val_fraction: float = 0.01
    max_document_chars: int = 5_000_000
    tfds_records_per_piece: int = 100_000
    workers: int = os.cpu_count() or 1
    sft: bool = False
    chat_template: str = ""

    def check(self) -> None:
        """A ValueError naming the argument (the CLI flag of the same name) and the fix."""
        if not self.inputs:
            raise ValueError("inputs (--input): give at least one glob or tfds:NAME")
        if self.train_tokenizer == bool(self.tokenizer):
            raise ValueError("give exactly one of tokenizer=PATH (--tokenizer) or "
                             "train_tokenizer=True (--train_tokenizer)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} (--val_fraction): must be in [0, 1)")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} (--workers): must be at least 1")
        if self.txt_mode not in readers.TXT_MODES:
            raise ValueError(f"txt_mode={self.txt_mode!r} (--txt_mode): use one of "
                             f"{readers.TXT_MODES}")
        if self.sft and self.chat_template not in sft.TEMPLATES:
            raise ValueError(f"chat_template={self.chat_template!r} (--chat_template): with sft, "
                             f"name the layout of the conversations: one of "
                             f"{', '.join(sft.TEMPLATES)}")
        if self.sft and any(spec.startswith(tfds_source.PREFIX) for spec in self.inputs):
            raise ValueError("inputs (--input): sft reads JSONL files, not tfds:NAME")


def prepare(inputs: str | list[str], output: str | os.PathLike, *, tokenizer: str | None = None,
            train_tokenizer: bool = False, vocab_size: int = 32000,
            tokenizer_sample_chars: int = 100_000_000, text_key: str = "text",
            txt_mode: str = "file", val_fraction: float = 0.01,
            max_document_chars: int = 5_000_000, tfds_records_per_piece: int = 100_000,
            workers: int | None = None, sft: bool = False, chat_template: str = "") -> dict:
    """Prepare (or finish preparing) `output` from `inputs`; return the metadata written.

    inputs: globs of .txt/.jsonl files (optionally .gz/.zst) or tfds:NAME; tokenizer: a
    sentencepiece .model or a Hugging Face tokenizer.json, or train_tokenizer (vocab_size
    pieces, on tokenizer_sample_chars characters of the input); sft: the inputs are chat /
    prompt-completion records, laid out by chat_template. Bad arguments: ValueError.
    """
    settings = Settings(
        inputs=(inputs,) if isinstance(inputs, str) else tuple(inputs), output=os.fspath(output),
        tokenizer=os.fspath(tokenizer) if tokenizer else None, train_tokenizer=train_tokenizer,
        vocab_size=vocab_size, tokenizer_sample_chars=tokenizer_sample_chars, text_key=text_key,
        txt_mode=txt_mode, val_fraction=val_fraction, max_document_chars=max_document_chars,
        tfds_records_per_piece=tfds_records_per_piece, workers=workers or os.cpu_count() or 1,
        sft=sft, chat_template=chat_template)
    settings.check()
    return run(settings)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The CLI's flags, named as prepare()'s arguments (`--input` fills `inputs`)."""
    p = argparse.ArgumentParser(prog="python -m jaxlm.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", dest="inputs", action="append", required=True,
                   help="glob of .txt/.jsonl files (optionally .gz/.zst), or tfds:NAME; "
                        "repeat the flag for several")
    p.add_argument("--output", required=True, help="directory to write the prepared dataset to")
    p.add_argument("--tokenizer", help="sentencepiece .model (LLaMA's works as is) or Hugging "
                                       "Face tokenizer.json to tokenize with")
    p.add_argument("--train_tokenizer", action="store_true",
                   help="train a BPE tokenizer on a sample of the input first")
    p.add_argument("--vocab_size", type=int, default=32000, help="with --train_tokenizer")
    p.add_argument("--tokenizer_sample_chars", type=int, default=100_000_000,
                   help="with --train_tokenizer: characters of input to train it on")
    p.add_argument("--text_key", default="text", help="JSONL / TFDS field holding the text")
    p.add_argument("--txt_mode", choices=readers.TXT_MODES, default="file",
                   help=".txt files: one document per file, or per blank-line-separated block")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of documents held out for validation (by a hash of the text)")
    p.add_argument("--max_document_chars", type=int, default=5_000_000,
                   help="skip (and count) documents longer than this")
    p.add_argument("--tfds_records_per_piece", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sft", action="store_true",
                   help="inputs are JSONL chat records {messages: [{role, content}]} or "
                        "{prompt, completion}: store tokens and the loss mask")
    p.add_argument("--chat_template", default="", choices=("", *sft.TEMPLATES),
                   help="with --sft: how a conversation is laid out (jaxlm.data.sft)")
    return p.parse_args(argv)


def is_validation(text: str, val_fraction: float) -> bool:
    return zlib.crc32(text.encode("utf-8", "replace")) % 1_000_000 < val_fraction * 1_000_000


# --- pieces: what one worker does in one go -------------------------------------------------

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
                    pieces.append({"tfds": name, "tfds_split": tfds_split, "start": start,
                                   "stop": min(n, start + records_per_piece),
                                   "split": split if "validation" in names else None})
        else:
            patterns.append(spec)
    for path in readers.expand(patterns) if patterns else []:
        stat = os.stat(path)
        pieces.append({"file": os.path.abspath(path), "size": stat.st_size,
                       "mtime_ns": stat.st_mtime_ns, "split": None})
    return pieces


def read_conversations(path: str, max_chars: int, skipped: readers.Skipped):
    """(messages, where) for each usable SFT record of a JSONL file; the rest to `skipped`."""
    if readers.format_of(path) != "jsonl":
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
        yield from read_conversations(piece["file"], args.max_document_chars, skipped)
        return
    if "file" in piece:
        yield from readers.read(piece["file"], args.text_key, args.txt_mode,
                                args.max_document_chars, skipped)
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


def _init_worker(tokenizer_path: str, chat_template: str) -> None:
    global _sp, _encoder
    _sp = tokenizer_lib.load(tokenizer_path)
    _encoder = sft.Encoder(_sp, chat_template, "chat_template") if chat_template else None


def _options(args: Settings, tokenizer_path) -> dict:
    """Everything besides the input that decides a piece's output (checked on resume)."""
    options = {"text_key": args.text_key, "txt_mode": args.txt_mode,
               "val_fraction": args.val_fraction, "max_document_chars": args.max_document_chars,
               "tokenizer_sha256": prepared.file_sha256(tokenizer_path)}
    if args.sft:
        options["chat_template"] = args.chat_template
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
        split = piece["split"] or ("validation" if is_validation(text, args.val_fraction)
                                   else "train")
        writers[split].write(record)
    for writer in writers.values():
        writer.finish()
    result = {
        "index": index, "piece": piece, "options": options,
        "documents": {s: len(w.lengths) for s, w in writers.items()},
        "tokens": {s: int(sum(w.lengths)) for s, w in writers.items()},
        "skipped": skipped.to_json(),
        "seconds": time.perf_counter() - start,
    }
    if args.sft:
        result["trained_tokens"] = {s: w.trained for s, w in writers.items()}
    prepared.write_json_atomic(prepared.piece_marker(root, index), result)
    return result


def _finished(root: epath.Path, index: int, piece: dict, options: dict) -> dict | None:
    """The piece's marker if it was finished from the same input and options, else None."""
    marker = prepared.piece_marker(root, index)
    if not marker.is_file():
        return None
    result = json.loads(marker.read_text())
    return result if (result["piece"], result["options"]) == (piece, options) else None


# --- the tokenizer ---------------------------------------------------------------------------

def tokenizer_for(args: Settings, pieces: list[dict]) -> epath.Path:
    """Copy the given tokenizer into the output under the name of its kind (tokenizer.model or
    tokenizer.json, with the Hugging Face files beside it), or train one on the input."""
    root = epath.Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    present = [root / name for name in (prepared.TOKENIZER, "tokenizer.json")
               if (root / name).exists()]
    if args.tokenizer:
        source = epath.Path(args.tokenizer)
        tokenizer_lib.load(source, "--tokenizer")  # fails clearly if it is neither kind
        target = root / prepared.tokenizer_file(source)
        if any(p != target or prepared.file_sha256(p) != prepared.file_sha256(source)
               for p in present):
            raise ValueError(f"{args.output} was prepared with another tokenizer; give a new "
                             f"--output or delete {args.output} first")
        if not present:
            extras = HF_TOKENIZER_EXTRAS if target.name == "tokenizer.json" else ()
            for name in extras:
                if (source.parent / name).is_file():
                    (source.parent / name).copy(root / name, overwrite=True)
            source.copy(target)  # last: its presence says the tokenizer is complete
        return target
    target = root / prepared.TOKENIZER
    if present:
        if present != [target]:
            raise ValueError(f"{args.output} was prepared with another tokenizer; give a new "
                             f"--output or delete {args.output} first")
        print(f"reusing the tokenizer already trained in {target}")
        return target
    print(f"training a {args.vocab_size}-piece BPE tokenizer on up to "
          f"{args.tokenizer_sample_chars:,} characters of the input ...", flush=True)
    skipped = readers.Skipped()
    sample = list(_sample_texts(pieces, args, skipped))
    if not sample:
        raise ValueError(f"no usable training documents in {list(args.inputs)} to train a "
                         "tokenizer on: " + "; ".join(skipped.report() or ["the input is empty"]))
    tokenizer_lib.train(sample, args.vocab_size, target)
    return target


def _sample_texts(pieces: list[dict], args: Settings, skipped: readers.Skipped):
    """Documents taken round-robin from the pieces, up to tokenizer_sample_chars."""
    readers_ = [read_piece(p, args, skipped) for p in pieces]
    budget = args.tokenizer_sample_chars
    for group in itertools.zip_longest(*readers_):
        for item in group:
            if item is None:
                continue
            text = sft.text_of(item[0]) if args.sft else item[0]
            yield text
            budget -= len(text)
            if budget <= 0:
                return


# --- the whole run ---------------------------------------------------------------------------

def run(args: Settings) -> dict:
    """Prepare (or finish preparing) args.output; return the metadata written."""
    root = epath.Path(args.output)
    pieces = list_pieces(list(args.inputs), args.tfds_records_per_piece)
    if not pieces:
        raise ValueError(f"--input={list(args.inputs)}: no input")
    tokenizer_path = tokenizer_for(args, pieces)
    sp = tokenizer_lib.load(tokenizer_path)
    if args.sft:  # the template's special tokens exist, before any worker starts
        sft.Encoder(sp, args.chat_template, "chat_template")
    if (root / prepared.METADATA).exists():  # complete again only when all is done
        (root / prepared.METADATA).unlink()

    options = _options(args, tokenizer_path)
    results = {i: r for i, p in enumerate(pieces) if (r := _finished(root, i, p, options))}
    todo = [(i, p, options, args) for i, p in enumerate(pieces) if i not in results]
    if results:
        print(f"resuming: {len(results)} of {len(pieces)} pieces already done")
    start, new_tokens = time.perf_counter(), 0
    bar = tqdm.tqdm(total=len(pieces), initial=len(results), unit="piece", dynamic_ncols=True)
    workers = min(args.workers, max(1, len(todo)))
    if todo:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        with context.Pool(workers, _init_worker,
                          (os.fspath(tokenizer_path), args.chat_template if args.sft else "")) as pool:
            for result in pool.imap_unordered(prepare_piece, todo):
                results[result["index"]] = result
                new_tokens += sum(result["tokens"].values())
                bar.set_postfix(tokens=f"{new_tokens:,}", refresh=False)
                bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start

    skipped = readers.Skipped()
    splits = {}
    for split in prepared.SPLITS:
        kept = [i for i in sorted(results) if results[i]["documents"][split]]
        splits[split] = {"pieces": kept,
                         "documents": sum(results[i]["documents"][split] for i in kept),
                         "tokens": sum(results[i]["tokens"][split] for i in kept)}
        if args.sft:
            splits[split]["trained_tokens"] = sum(results[i]["trained_tokens"][split]
                                                  for i in kept)
    for r in results.values():
        skipped.merge(r["skipped"])
    if not splits["train"]["documents"]:
        raise ValueError(f"no usable training documents in {list(args.inputs)}: "
                         + "; ".join(skipped.report() or ["the input is empty"]))
    metadata = {
        "format": prepared.FORMAT, "kind": "sft" if args.sft else "text",
        "inputs": list(args.inputs), "text_key": args.text_key, "txt_mode": args.txt_mode,
        "val_fraction": args.val_fraction, "max_document_chars": args.max_document_chars,
        "tokenizer": {"file": tokenizer_path.name, "sha256": prepared.file_sha256(tokenizer_path),
                      "vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(),
                      "eos_id": sp.eos_id(), "pad_id": sp.pad_id()},
        "splits": splits,
        "skipped": skipped.to_json(),
        "pieces": len(pieces),
    }
    if args.sft:
        metadata["chat_template"] = args.chat_template
    prepared.write_json_atomic(root / prepared.METADATA, metadata)

    for split, s in splits.items():
        trained = (f" ({s['trained_tokens']:,} trained by the loss mask)" if args.sft else "")
        print(f"{split}: {s['documents']:,} {'conversations' if args.sft else 'documents'}, "
              f"{s['tokens']:,} tokens{trained}")
    for line in skipped.report():
        print(line)
    if new_tokens:
        print(f"tokenized {new_tokens:,} tokens in {seconds:.1f} s "
              f"({new_tokens / seconds:,.0f} tokens/s, {workers} workers)")
    print(f"wrote {root}; train on it with --config.data.source=arrayrecord:{root} "
          f"--config.model.vocab_size={sp.vocab_size()} (or larger)")
    return metadata


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prepare(**vars(args))
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
