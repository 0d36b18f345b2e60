"""Tokenize a corpus into ArrayRecord shards that training reads by index.

    python -m jaxlm.data.prepare --input='corpus/*.jsonl' --text_key=text \
        --output=data/mycorpus --tokenizer=path/to/tokenizer.model
    python -m jaxlm.data.prepare --input='books/*.txt.gz' --txt_mode=blank_line \
        --output=data/books --train_tokenizer --vocab_size=32000
    python -m jaxlm.data.prepare --input=tfds:lm1b --output=data/lm1b --tokenizer=...

Each input file (or each range of a TFDS split) is a piece, tokenized by a worker
process into a train and a validation shard; a document is held out when a hash of its
text says so, so the split does not depend on file order or worker count. Finished
pieces are marked, so running the same command again after an interruption only does
what is left. Unusable documents are skipped and counted, with where they were.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import zlib

import numpy as np
import tqdm

from jaxlm.data import prepared, readers, tfds_source
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.documents import TOKEN_DTYPE

ENCODE_BATCH = 256


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxlm.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="glob of .txt/.jsonl files (optionally .gz/.zst), or tfds:NAME; "
                        "repeat the flag for several")
    p.add_argument("--output", required=True, help="directory to write the prepared dataset to")
    p.add_argument("--tokenizer", help="sentencepiece .model to tokenize with (LLaMA's works as is)")
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
    args = p.parse_args(argv)
    if args.train_tokenizer == bool(args.tokenizer):
        p.error("give exactly one of --tokenizer=PATH or --train_tokenizer")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val_fraction={args.val_fraction}: must be in [0, 1)")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


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


def read_piece(piece: dict, args, skipped: readers.Skipped):
    """(text, where) for each usable document of the piece."""
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

    def __init__(self, root: pathlib.Path, split: str, index: int):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.path = prepared.shard_path(root, split, index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.writer = ArrayRecordWriter(str(self.tmp), "group_size:1")  # cheap random reads
        self.lengths_path = prepared.lengths_path(root, split, index)
        self.lengths: list[int] = []

    def write(self, tokens: np.ndarray) -> None:
        self.writer.write(tokens.tobytes())
        self.lengths.append(len(tokens))

    def finish(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)
        tmp = self.lengths_path.with_name(self.lengths_path.name + ".tmp.npy")
        np.save(tmp, np.asarray(self.lengths, np.int32))
        os.replace(tmp, self.lengths_path)


_sp = None  # the worker's tokenizer, loaded once per process


def _init_worker(tokenizer_path: str) -> None:
    global _sp
    _sp = tokenizer_lib.load(tokenizer_path)


def _options(args, tokenizer_path) -> dict:
    """Everything besides the input that decides a piece's output (checked on resume)."""
    return {"text_key": args.text_key, "txt_mode": args.txt_mode, "val_fraction": args.val_fraction,
            "max_document_chars": args.max_document_chars,
            "tokenizer_sha256": prepared.file_sha256(tokenizer_path)}


def prepare_piece(job: tuple[int, dict, dict, argparse.Namespace]) -> dict:
    """Tokenize one piece into its shards, then write its marker (the resume record)."""
    index, piece, options, args = job
    root = pathlib.Path(args.output)
    start = time.perf_counter()
    skipped = readers.Skipped()
    writers = {split: _ShardWriter(root, split, index) for split in prepared.SPLITS}
    bos, eos = _sp.bos_id(), _sp.eos_id()
    prefix, suffix = [bos] if bos >= 0 else [], [eos] if eos >= 0 else []
    documents = read_piece(piece, args, skipped)
    while batch := list(itertools.islice(documents, ENCODE_BATCH)):
        texts = [text for text, _ in batch]
        for text, ids in zip(texts, _sp.encode(texts)):
            split = piece["split"] or ("validation" if is_validation(text, args.val_fraction)
                                       else "train")
            writers[split].write(np.asarray(prefix + ids + suffix, TOKEN_DTYPE))
    for writer in writers.values():
        writer.finish()
    result = {
        "index": index, "piece": piece, "options": options,
        "documents": {s: len(w.lengths) for s, w in writers.items()},
        "tokens": {s: int(sum(w.lengths)) for s, w in writers.items()},
        "skipped": skipped.to_json(),
        "seconds": time.perf_counter() - start,
    }
    prepared.write_json_atomic(prepared.piece_marker(root, index), result)
    return result


def _finished(root: pathlib.Path, index: int, piece: dict, options: dict) -> dict | None:
    """The piece's marker if it was finished from the same input and options, else None."""
    marker = prepared.piece_marker(root, index)
    if not marker.is_file():
        return None
    result = json.loads(marker.read_text())
    return result if (result["piece"], result["options"]) == (piece, options) else None


# --- the tokenizer ---------------------------------------------------------------------------

def tokenizer_for(args, pieces: list[dict]) -> pathlib.Path:
    """Copy the given tokenizer into the output, or train one on a sample of the input."""
    root = pathlib.Path(args.output)
    target = root / prepared.TOKENIZER
    root.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer_lib.load(args.tokenizer, "--tokenizer")  # fails clearly if not sentencepiece
        if target.exists() and prepared.file_sha256(target) != prepared.file_sha256(args.tokenizer):
            raise ValueError(f"{args.output} was prepared with another tokenizer; give a new "
                             f"--output or delete {args.output} first")
        if not target.exists():
            shutil.copyfile(args.tokenizer, target)
        return target
    if target.exists():
        print(f"reusing the tokenizer already trained in {target}")
        return target
    print(f"training a {args.vocab_size}-piece BPE tokenizer on up to "
          f"{args.tokenizer_sample_chars:,} characters of the input ...", flush=True)
    skipped = readers.Skipped()
    sample = list(_sample_texts(pieces, args, skipped))
    if not sample:
        raise ValueError(f"no usable training documents in {args.input} to train a tokenizer on: "
                         + "; ".join(skipped.report() or ["the input is empty"]))
    tokenizer_lib.train(sample, args.vocab_size, target)
    return target


def _sample_texts(pieces: list[dict], args, skipped: readers.Skipped):
    """Documents taken round-robin from the pieces, up to tokenizer_sample_chars."""
    readers_ = [read_piece(p, args, skipped) for p in pieces]
    budget = args.tokenizer_sample_chars
    for group in itertools.zip_longest(*readers_):
        for item in group:
            if item is None:
                continue
            yield item[0]
            budget -= len(item[0])
            if budget <= 0:
                return


# --- the whole run ---------------------------------------------------------------------------

def run(args) -> dict:
    """Prepare (or finish preparing) args.output; return the metadata written."""
    root = pathlib.Path(args.output)
    pieces = list_pieces(args.input, args.tfds_records_per_piece)
    if not pieces:
        raise ValueError(f"--input={args.input}: no input")
    tokenizer_path = tokenizer_for(args, pieces)
    sp = tokenizer_lib.load(tokenizer_path)
    (root / prepared.METADATA).unlink(missing_ok=True)  # complete again only when all is done

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
        with context.Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:
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
    for r in results.values():
        skipped.merge(r["skipped"])
    if not splits["train"]["documents"]:
        raise ValueError(f"no usable training documents in {args.input}: "
                         + "; ".join(skipped.report() or ["the input is empty"]))
    metadata = {
        "format": prepared.FORMAT,
        "inputs": args.input, "text_key": args.text_key, "txt_mode": args.txt_mode,
        "val_fraction": args.val_fraction, "max_document_chars": args.max_document_chars,
        "tokenizer": {"file": prepared.TOKENIZER, "sha256": prepared.file_sha256(tokenizer_path),
                      "vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(),
                      "eos_id": sp.eos_id(), "pad_id": sp.pad_id()},
        "splits": splits,
        "skipped": skipped.to_json(),
        "pieces": len(pieces),
    }
    prepared.write_json_atomic(root / prepared.METADATA, metadata)

    for split, s in splits.items():
        print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens")
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
        run(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
