"""A prepared dataset on disk: what `jaxlm.data.prepare` writes and training reads.

    <dir>/tokenizer.model             the tokenizer the tokens came from: a sentencepiece model,
      or tokenizer.json                 or a Hugging Face tokenizer.json (+ tokenizer_config.json)
    <dir>/<split>/<piece>.array_record  one record per document: bos + ids + eos, int32 (SFT:
                                        tokens then loss mask, jaxlm.data.sft)
    <dir>/<split>/<piece>.lengths.npy   tokens per record, so packing needs no scan
    <dir>/pieces/<piece>.json         written last for a finished input piece (resume)
    <dir>/metadata.json               written last of all: splits, counts, tokenizer

A piece is one input file (or one range of a TFDS split); its train and validation
shards are written together, so a finished piece is never redone. The small files are
read and written through etils.epath (local or gs://).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from etils import epath

from jaxlm import files
from jaxlm.data.documents import ArrayRecordDocuments
from jaxlm.errors import ConfigError

FORMAT = "jaxlm-prepared-v1"
METADATA = "metadata.json"
TOKENIZER = "tokenizer.model"  # the name for a sentencepiece model; tokenizer_file() for any
SPLITS = ("train", "validation")


def tokenizer_file(source: epath.PathLike) -> str:
    """The name a tokenizer keeps in a prepared dataset: its kind decides how it is loaded."""
    return "tokenizer.json" if epath.Path(source).suffix == ".json" else TOKENIZER


def shard_path(root: epath.Path, split: str, piece: int) -> epath.Path:
    return root / split / f"{piece:05d}.array_record"


def lengths_path(root: epath.Path, split: str, piece: int) -> epath.Path:
    return root / split / f"{piece:05d}.lengths.npy"


def piece_marker(root: epath.Path, piece: int) -> epath.Path:
    return root / "pieces" / f"{piece:05d}.json"


def file_sha256(path: epath.PathLike) -> str:
    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def write_json_atomic(path: epath.PathLike, value) -> None:
    """Write then rename, so a reader (or a resume) never sees half a file."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, json.dumps(value, indent=1, sort_keys=True))


def _load_npy(path: epath.Path) -> np.ndarray:
    with path.open("rb") as f:
        return np.load(f)


class PreparedDataset:
    """Read side: metadata, tokenizer path and the documents of each split."""

    def __init__(self, root: epath.PathLike, field: str = "config.data.source"):
        self.root = epath.Path(root)
        meta_path = self.root / METADATA
        if not meta_path.is_file():
            hint = (
                "an unfinished prepare (run the same prepare command again to finish it)"
                if (self.root / "pieces").is_dir()
                else "not a prepared dataset"
            )
            raise ConfigError(
                f"{field}: {self.root} has no {METADATA}: {hint}. Prepare one with "
                f"`python -m jaxlm.data.prepare --input=... --output={self.root} "
                "--tokenizer=... (or --train_tokenizer --vocab_size=N)`"
            )
        self.metadata = json.loads(meta_path.read_text())
        if self.metadata.get("format") != FORMAT:
            raise ConfigError(
                f"{field}: {meta_path} has format {self.metadata.get('format')!r}, "
                f"this jaxlm reads {FORMAT!r}; prepare the data again"
            )

    @property
    def tokenizer_path(self) -> epath.Path:
        return self.root / self.metadata["tokenizer"].get("file", TOKENIZER)

    @property
    def is_sft(self) -> bool:
        """Conversations with loss masks (prepare --sft), packed whole per row."""
        return self.metadata.get("kind") == "sft"

    def documents(self, split: str) -> ArrayRecordDocuments:
        pieces = self.metadata["splits"][split]["pieces"]
        paths = [shard_path(self.root, split, p) for p in pieces]
        lengths = [_load_npy(lengths_path(self.root, split, p)) for p in pieces]
        return ArrayRecordDocuments(
            paths, np.concatenate(lengths) if lengths else np.zeros(0), masked=self.is_sft
        )

    def fingerprint(self) -> str:
        """Changes when the prepared data does (for the resume check)."""
        return hashlib.sha256((self.root / METADATA).read_bytes()).hexdigest()[:16]
