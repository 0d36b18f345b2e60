"""Tokenized documents -> packed rows -> shuffled, per-process batches, with grain.

Documents (each `bos ... eos`) are laid end to end in a seeded order and cut into rows of
`seq_len + 1` tokens (consecutive rows overlap by one token, so no next-token pair is
lost; the last row is padded). Packing is done once, as a random-access array, so every
batch is a pure function of (seed, step): resuming needs only the step, and any number of
processes can each read their share of the same global batch. grain shuffles rows
(afresh each epoch), batches them and prefetches on threads.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.config import ConfigError
from jaxlm.data import corpus, tokenizer as tokenizer_lib

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def tokenize(sp, documents: list[str]) -> list[np.ndarray]:
    """Each document as `bos + pieces + eos` int32 ids."""
    bos, eos = sp.bos_id(), sp.eos_id()
    return [np.asarray([bos, *ids, eos], np.int32) for ids in sp.encode(documents, num_threads=2)]


class PackedRows:
    """Random-access rows cut from documents concatenated in a seeded order.

    Row i holds inputs/targets (next token), segment_ids (1, 2, ... per document within
    the row, 0 for padding), positions (restarting at 0 at each document start within the
    row) and loss_mask (True where the target continues the input's document).
    """

    def __init__(self, documents: list[np.ndarray], seq_len: int, seed: int):
        order = np.random.default_rng(seed).permutation(len(documents))
        lengths = np.array([len(documents[i]) for i in order])
        self.tokens = np.concatenate([documents[i] for i in order]).astype(np.int32)
        self.doc_ids = np.repeat(np.arange(1, len(order) + 1, dtype=np.int32), lengths)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(1, -(-(len(self.tokens) - 1) // self.seq_len))

    def __getitem__(self, i: int) -> dict:
        length = self.seq_len
        start = int(i) * length
        tokens = np.zeros(length + 1, np.int32)
        doc_ids = np.zeros(length + 1, np.int32)
        chunk = self.tokens[start:start + length + 1]
        tokens[:len(chunk)] = chunk
        doc_ids[:len(chunk)] = self.doc_ids[start:start + length + 1]

        doc = doc_ids[:-1]
        starts = np.concatenate([[True], doc[1:] != doc[:-1]])
        segment_ids = (np.cumsum(starts) * (doc != 0)).astype(np.int32)
        index = np.arange(length)
        positions = (index - np.maximum.accumulate(np.where(starts, index, 0))).astype(np.int32)
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "positions": positions,
            "segment_ids": segment_ids,
            "loss_mask": (doc_ids[1:] == doc) & (doc != 0),
        }

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _process_share(global_batch_size: int) -> tuple[int, int, int]:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ConfigError(f"a batch of {global_batch_size} sequences cannot be split evenly over "
                          f"{count} processes; make train.global_batch_size / "
                          f"train.grad_accum_steps a multiple of {count}")
    return global_batch_size // count, index, count


def train_dataset(rows: PackedRows, global_batch_size: int, seed: int) -> grain.MapDataset:
    """This process's batches: element k is its share of global batch k."""
    local, index, count = _process_share(global_batch_size)
    batches = grain.MapDataset.source(rows).shuffle(seed=seed).repeat().batch(local)
    return batches[index::count]


def eval_dataset(rows: PackedRows, global_batch_size: int, n_batches: int) -> grain.MapDataset:
    """A fixed list of validation batches (the same every evaluation)."""
    local, index, count = _process_share(global_batch_size)
    batches = grain.MapDataset.source(rows).repeat().batch(local)
    return batches[index::count][:n_batches]


def iterate(dataset: grain.MapDataset, start: int, num_threads: int, prefetch: int) -> Iterator:
    """Iterate from element `start`, prefetching on threads."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset[start:].to_iter_dataset(options))


@dataclasses.dataclass
class Data:
    tokenizer: object
    tokenizer_path: str
    train_rows: PackedRows
    val_rows: PackedRows


def load_or_train_tokenizer(config, workdir: pathlib.Path, train_docs: list[str]):
    """config.data.tokenizer if given; else the workdir's cached one; else train and cache."""
    if config.data.tokenizer:
        return tokenizer_lib.load(config.data.tokenizer), config.data.tokenizer
    path = workdir / "tokenizer.model"
    if not path.exists() and jax.process_index() == 0:
        tokenizer_lib.train(train_docs, config.model.vocab_size, path, seed=config.seed)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm tokenizer written")
    return tokenizer_lib.load(path), str(path)


def build(config, workdir: str | pathlib.Path) -> Data:
    """The tokenizer and packed train/validation rows for config.data."""
    d = config.data
    if d.source != "builtin":
        raise ConfigError(f"config.data.source={d.source!r} is not supported yet; use 'builtin'")
    train_docs = corpus.builtin_documents("train", d.val_fraction)
    val_docs = corpus.builtin_documents("validation", d.val_fraction)
    sp, sp_path = load_or_train_tokenizer(config, pathlib.Path(workdir), train_docs)
    if sp.vocab_size() > config.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({sp.vocab_size()} pieces, {sp_path}); set "
                          f"model.vocab_size to at least {sp.vocab_size()}")
    return Data(
        tokenizer=sp, tokenizer_path=sp_path,
        train_rows=PackedRows(tokenize(sp, train_docs), d.seq_len, seed=config.seed),
        val_rows=PackedRows(tokenize(sp, val_docs), d.seq_len, seed=config.seed),
    )
