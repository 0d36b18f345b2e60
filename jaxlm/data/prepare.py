"""Tokenize a corpus into ArrayRecord shards that training reads by index.

    python -m jaxlm.data.prepare --input='corpus/*.jsonl' --text_key=text \
        --output=data/mycorpus --tokenizer=path/to/tokenizer.model
    python -m jaxlm.data.prepare --input='books/*.txt.gz' --txt_mode=blank_line \
        --output=data/books --train_tokenizer --vocab_size=32000
    python -m jaxlm.data.prepare --input=tfds:lm1b --output=data/lm1b --tokenizer=...
    python -m jaxlm.data.prepare --sft --chat_template=llama3 --input='chats/*.jsonl.zst' \
        --output=data/chats --tokenizer=runs/llama3/tokenizer.json

Each input file (or each range of a TFDS split) is a piece, tokenized by a worker
process into a train and a validation shard (jaxlm.data.pieces); a document is held out
when a hash of its text says so, so the split does not depend on file order or worker
count. Finished pieces are marked, so running the same command again after an
interruption only does what is left. Unusable documents are skipped and counted, with
where they were.

With --sft the inputs are chat / prompt-completion JSONL records (jaxlm.data.sft): each is
laid out by --chat_template and stored as its tokens and loss mask.

`prepare(inputs, output, tokenizer=..., ...)` is the same as a function; the CLI is a thin
layer over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import os
import sys
import time

import tqdm
from etils import epath

from jaxlm import platforms
from jaxlm.data import pieces as pieces_lib
from jaxlm.data import prepared, readers, sft, tfds_source
from jaxlm.data import tokenizer as tokenizer_lib

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
    input_format: str = "auto"
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
            raise ValueError(
                "give exactly one of tokenizer=PATH (--tokenizer) or "
                "train_tokenizer=True (--train_tokenizer)"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} (--val_fraction): must be in [0, 1)"
            )
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} (--workers): must be at least 1")
        if self.txt_mode not in readers.TXT_MODES:
            raise ValueError(
                f"txt_mode={self.txt_mode!r} (--txt_mode): use one of {readers.TXT_MODES}"
            )
        if self.input_format not in readers.FORMATS:
            raise ValueError(
                f"input_format={self.input_format!r} (--format): use one of {readers.FORMATS}"
            )
        if self.sft and self.chat_template not in sft.TEMPLATES:
            raise ValueError(
                f"chat_template={self.chat_template!r} (--chat_template): with sft, "
                f"name the layout of the conversations: one of "
                f"{', '.join(sft.TEMPLATES)}"
            )
        if self.sft and any(spec.startswith(tfds_source.PREFIX) for spec in self.inputs):
            raise ValueError("inputs (--input): sft reads JSONL files, not tfds:NAME")


def prepare(
    inputs: str | list[str],
    output: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    train_tokenizer: bool = False,
    vocab_size: int = 32000,
    tokenizer_sample_chars: int = 100_000_000,
    text_key: str = "text",
    txt_mode: str = "file",
    input_format: str = "auto",
    val_fraction: float = 0.01,
    max_document_chars: int = 5_000_000,
    tfds_records_per_piece: int = 100_000,
    workers: int | None = None,
    sft: bool = False,
    chat_template: str = "",
) -> dict:
    """Prepare (or finish preparing) `output` from `inputs`; return the metadata written.

    inputs: globs of .txt/.jsonl/source files (optionally .gz/.zst) or tfds:NAME, read by
    their extension unless input_format says "text" or "jsonl"; tokenizer: a
    sentencepiece .model or a Hugging Face tokenizer.json, or train_tokenizer (vocab_size
    pieces, on tokenizer_sample_chars characters of the input); sft: the inputs are chat /
    prompt-completion records, laid out by chat_template. Bad arguments: ValueError.
    """
    settings = Settings(
        inputs=(inputs,) if isinstance(inputs, str) else tuple(inputs),
        output=os.fspath(output),
        tokenizer=os.fspath(tokenizer) if tokenizer else None,
        train_tokenizer=train_tokenizer,
        vocab_size=vocab_size,
        tokenizer_sample_chars=tokenizer_sample_chars,
        text_key=text_key,
        txt_mode=txt_mode,
        input_format=input_format,
        val_fraction=val_fraction,
        max_document_chars=max_document_chars,
        tfds_records_per_piece=tfds_records_per_piece,
        workers=workers or os.cpu_count() or 1,
        sft=sft,
        chat_template=chat_template,
    )
    settings.check()
    return run(settings)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The CLI's flags, named as prepare()'s arguments (`--input` fills `inputs`)."""
    p = argparse.ArgumentParser(
        prog="python -m jaxlm.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        required=True,
        help="glob of .txt/.jsonl or source files (.py, .md, ...; optionally "
        ".gz/.zst), or tfds:NAME; repeat the flag for several",
    )
    p.add_argument("--output", required=True, help="directory to write the prepared dataset to")
    p.add_argument(
        "--tokenizer",
        help="sentencepiece .model (LLaMA's works as is) or Hugging "
        "Face tokenizer.json to tokenize with",
    )
    p.add_argument(
        "--train_tokenizer",
        action="store_true",
        help="train a BPE tokenizer on a sample of the input first",
    )
    p.add_argument("--vocab_size", type=int, default=32000, help="with --train_tokenizer")
    p.add_argument(
        "--tokenizer_sample_chars",
        type=int,
        default=100_000_000,
        help="with --train_tokenizer: characters of input to train it on",
    )
    p.add_argument("--text_key", default="text", help="JSONL / TFDS field holding the text")
    p.add_argument(
        "--txt_mode",
        choices=readers.TXT_MODES,
        default="file",
        help=".txt files: one document per file, or per blank-line-separated block",
    )
    p.add_argument(
        "--format",
        dest="input_format",
        choices=readers.FORMATS,
        default="auto",
        help="how to read the input files: by their extension (.txt and source files "
        "as text, .jsonl), or all as text (any extension) or all as JSONL",
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.01,
        help="share of documents held out for validation (by a hash of the text)",
    )
    p.add_argument(
        "--max_document_chars",
        type=int,
        default=5_000_000,
        help="skip (and count) documents longer than this",
    )
    p.add_argument("--tfds_records_per_piece", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--sft",
        action="store_true",
        help="inputs are JSONL chat records {messages: [{role, content}]} or "
        "{prompt, completion}: store tokens and the loss mask",
    )
    p.add_argument(
        "--chat_template",
        default="",
        choices=("", *sft.TEMPLATES),
        help="with --sft: how a conversation is laid out (jaxlm.data.sft)",
    )
    return p.parse_args(argv)


# --- the tokenizer ---------------------------------------------------------------------------


def tokenizer_for(args: Settings, pieces: list[dict]) -> epath.Path:
    """Copy the given tokenizer into the output under the name of its kind (tokenizer.model or
    tokenizer.json, with the Hugging Face files beside it), or train one on the input."""
    root = epath.Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    present = [
        root / name for name in (prepared.TOKENIZER, "tokenizer.json") if (root / name).exists()
    ]
    if args.tokenizer:
        source = epath.Path(args.tokenizer)
        tokenizer_lib.load(source, "--tokenizer")  # fails clearly if it is neither kind
        target = root / prepared.tokenizer_file(source)
        if any(
            p != target or prepared.file_sha256(p) != prepared.file_sha256(source) for p in present
        ):
            raise ValueError(
                f"{args.output} was prepared with another tokenizer; give a new "
                f"--output or delete {args.output} first"
            )
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
            raise ValueError(
                f"{args.output} was prepared with another tokenizer; give a new "
                f"--output or delete {args.output} first"
            )
        print(f"reusing the tokenizer already trained in {target}")
        return target
    print(
        f"training a {args.vocab_size}-piece BPE tokenizer on up to "
        f"{args.tokenizer_sample_chars:,} characters of the input ...",
        flush=True,
    )
    skipped = readers.Skipped()
    sample = list(_sample_texts(pieces, args, skipped))
    if not sample:
        raise ValueError(
            f"no usable training documents in {list(args.inputs)} to train a "
            "tokenizer on: " + "; ".join(skipped.report() or ["the input is empty"])
        )
    tokenizer_lib.train(sample, args.vocab_size, target)
    return target


def _sample_texts(pieces: list[dict], args: Settings, skipped: readers.Skipped):
    """Documents taken round-robin from the pieces, up to tokenizer_sample_chars."""
    readers_ = [pieces_lib.read_piece(p, args, skipped) for p in pieces]
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
    pieces = pieces_lib.list_pieces(list(args.inputs), args.tfds_records_per_piece)
    if not pieces:
        raise ValueError(f"--input={list(args.inputs)}: no input")
    for piece in pieces:  # an unreadable kind of file fails now, not in a worker
        if "file" in piece:
            readers.format_of(piece["file"], args.input_format)
    tokenizer_path = tokenizer_for(args, pieces)
    sp = tokenizer_lib.load(tokenizer_path)
    if args.sft:  # the template's special tokens exist, before any worker starts
        sft.Encoder(sp, args.chat_template, "chat_template")
    if (root / prepared.METADATA).exists():  # complete again only when all is done
        (root / prepared.METADATA).unlink()

    options = pieces_lib.piece_options(args, tokenizer_path)
    results = {
        i: r for i, p in enumerate(pieces) if (r := pieces_lib.finished(root, i, p, options))
    }
    todo = [(i, p, options, args) for i, p in enumerate(pieces) if i not in results]
    if results:
        print(f"resuming: {len(results)} of {len(pieces)} pieces already done")
    start, new_tokens = time.perf_counter(), 0
    bar = tqdm.tqdm(total=len(pieces), initial=len(results), unit="piece", dynamic_ncols=True)
    workers = min(args.workers, max(1, len(todo)))
    if todo:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        worker_args = (os.fspath(tokenizer_path), args.chat_template if args.sft else "")
        with context.Pool(workers, pieces_lib.init_worker, worker_args) as pool:
            for result in pool.imap_unordered(pieces_lib.prepare_piece, todo):
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
        splits[split] = {
            "pieces": kept,
            "documents": sum(results[i]["documents"][split] for i in kept),
            "tokens": sum(results[i]["tokens"][split] for i in kept),
        }
        if args.sft:
            splits[split]["trained_tokens"] = sum(results[i]["trained_tokens"][split] for i in kept)
    for r in results.values():
        skipped.merge(r["skipped"])
    if not splits["train"]["documents"]:
        raise ValueError(
            f"no usable training documents in {list(args.inputs)}: "
            + "; ".join(skipped.report() or ["the input is empty"])
        )
    metadata = {
        "format": prepared.FORMAT,
        "kind": "sft" if args.sft else "text",
        "inputs": list(args.inputs),
        "text_key": args.text_key,
        "txt_mode": args.txt_mode,
        "val_fraction": args.val_fraction,
        "max_document_chars": args.max_document_chars,
        "tokenizer": {
            "file": tokenizer_path.name,
            "sha256": prepared.file_sha256(tokenizer_path),
            "vocab_size": sp.vocab_size(),
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "pad_id": sp.pad_id(),
        },
        "splits": splits,
        "skipped": skipped.to_json(),
        "pieces": len(pieces),
    }
    if args.sft:
        metadata["chat_template"] = args.chat_template
    if args.input_format != "auto":
        metadata["input_format"] = args.input_format
    prepared.write_json_atomic(root / prepared.METADATA, metadata)

    for split, s in splits.items():
        trained = f" ({s['trained_tokens']:,} trained by the loss mask)" if args.sft else ""
        print(
            f"{split}: {s['documents']:,} {'conversations' if args.sft else 'documents'}, "
            f"{s['tokens']:,} tokens{trained}"
        )
    for line in skipped.report():
        print(line)
    if new_tokens:
        print(
            f"tokenized {new_tokens:,} tokens in {seconds:.1f} s "
            f"({new_tokens / seconds:,.0f} tokens/s, {workers} workers)"
        )
    print(
        f"wrote {root}; train on it with --config.data.source=arrayrecord:{root} "
        f"--config.model.vocab_size={sp.vocab_size()} (or larger)"
    )
    return metadata


def main(argv: list[str] | None = None) -> None:
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prepare(**vars(args))
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
