"""Tokenized documents packed into rows: random access, a pure function of the seed.

Documents (each `bos ... eos`) are laid end to end in a seeded order and cut into rows of
`seq_len + 1` tokens (consecutive rows overlap by one token, so no next-token pair is
lost, and a document longer than a row simply continues in the next row; only the last
row is padded). Only document lengths are needed to find which documents a row spans,
so rows are random access over any source (memory, ArrayRecord) and every batch is a
pure function of (seed, batch index).

A short-to-long schedule (config.data.seq_len_schedule) changes only how a batch is cut:
batch k is always the same rows of data.seq_len, and `cut_rows` splits each into
seq_len / s consecutive rows of s tokens, which are exactly the rows PackedRows would cut
at length s (row i's piece j is row i * seq_len / s + j there). So tokens per step are
constant, no token is skipped or repeated when a stage starts, and a batch is a pure
function of (seed, batch index, the stage of its step): resuming anywhere is exact.

SFT data (conversations with a loss mask, jaxlm.data.sft) is packed by PackedConversations
instead: whole conversations per row, never split across rows (an answer cut from its question
teaches nothing), padding after the last one that fits; the mask travels with the tokens.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data import sft
from jaxlm.data.documents import TOKEN_DTYPE, Documents, InMemoryDocuments
from jaxlm.errors import ConfigError

OPEN_ROWS = 64  # PackedConversations: rows still being filled at once


class PackedRows:
    """Random-access rows cut from documents concatenated in a seeded order.

    Row i holds inputs/targets (next token), segment_ids (1, 2, ... per document within
    the row, 0 for padding), positions (restarting at 0 at each document start within the
    row) and loss_mask (True where the target continues the input's document).
    """

    def __init__(self, documents: Documents | list[np.ndarray], seq_len: int, seed: int):
        if isinstance(documents, list):
            documents = InMemoryDocuments(documents)
        self.documents = documents
        self.order = np.random.default_rng(seed).permutation(len(documents))
        self.ends = np.cumsum(documents.lengths[self.order])  # end of each document, in order
        self.seq_len = seq_len

    @property
    def n_tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return max(1, -(-(self.n_tokens - 1) // self.seq_len))

    @property
    def padding_fraction(self) -> float:
        """Share of input positions that are padding (only the last row has any)."""
        return 1 - max(0, self.n_tokens - 1) / (len(self) * self.seq_len)

    def describe(self) -> str:
        return (
            f"{self.n_tokens:,} tokens in {len(self):,} rows of {self.seq_len} "
            f"({100 * self.padding_fraction:.2f}% padding)"
        )

    def _span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of the concatenation and their 1-based document numbers."""
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, stop - 1, side="right"))
        tokens, doc_ids = [], []
        for k in range(first, last + 1):
            doc_start = int(self.ends[k - 1]) if k else 0
            doc = self.documents[int(self.order[k])]
            piece = doc[
                max(start, doc_start) - doc_start : min(stop, int(self.ends[k])) - doc_start
            ]
            tokens.append(piece)
            doc_ids.append(np.full(len(piece), k + 1, np.int32))
        return np.concatenate(tokens), np.concatenate(doc_ids)

    def __getitem__(self, i: int) -> dict:
        length = self.seq_len
        start = int(i) * length
        stop = min(start + length + 1, self.n_tokens)
        tokens = np.zeros(length + 1, TOKEN_DTYPE)
        doc_ids = np.zeros(length + 1, np.int32)
        if stop > start:
            chunk, chunk_docs = self._span(start, stop)
            tokens[: len(chunk)], doc_ids[: len(chunk)] = chunk, chunk_docs
        return _row(tokens, doc_ids)


def _row(tokens: np.ndarray, doc_ids: np.ndarray, trained: np.ndarray | None = None) -> dict:
    """A row's fields from its seq_len + 1 tokens, their documents (0: padding) and, for SFT,
    which tokens the loss trains on: a target counts where it continues its document."""
    doc = doc_ids[:-1]
    segment_ids, positions = _layout(doc)
    loss_mask = (doc_ids[1:] == doc) & (doc != 0)
    if trained is not None:
        loss_mask &= trained[1:] == 1
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
    }


class PackedConversations:
    """Random-access rows of whole conversations (SFT documents [2, n]: tokens, loss mask).

    Conversations are taken in a seeded order and placed first-fit into up to OPEN_ROWS rows
    being filled (the fullest is closed when one more is needed), each row holding up to
    seq_len + 1 tokens (its inputs and its last target). Fields as PackedRows gives them; a
    target counts (loss_mask) where it continues its conversation and the conversation's mask
    is 1 there. A conversation longer than a row follows `overflow`: "drop" leaves it out,
    "truncate_left" keeps its last seq_len + 1 tokens (the start of the prompt goes; the
    answers, their mask bits with them, stay). Both are counted (`overflowed`).
    """

    def __init__(
        self,
        documents: Documents | list[np.ndarray],
        seq_len: int,
        seed: int,
        overflow: str = "drop",
    ):
        if isinstance(documents, list):
            documents = InMemoryDocuments(documents)
        if overflow not in sft.OVERFLOW_POLICIES:
            raise ConfigError(
                f"config.data.sft_overflow={overflow!r}: use one of {sft.OVERFLOW_POLICIES}"
            )
        self.documents, self.seq_len, self.overflow = documents, seq_len, overflow
        capacity = seq_len + 1
        lengths = np.asarray(documents.lengths, np.int64)
        too_long = lengths > capacity
        self.overflowed = int(too_long.sum())
        self.overflowed_tokens = int(
            (lengths[too_long] - capacity).sum()
            if overflow == "truncate_left"
            else lengths[too_long].sum()
        )
        candidates = np.flatnonzero(~too_long) if overflow == "drop" else np.arange(len(lengths))
        order = np.random.default_rng(seed).permutation(candidates)
        self.row_docs, self.row_starts = _first_fit(
            order, np.minimum(lengths, capacity)[order], capacity
        )
        self.n_conversations = len(order)
        self.n_tokens = int(np.minimum(lengths, capacity)[order].sum())

    def __len__(self) -> int:
        return max(1, len(self.row_starts) - 1)

    @property
    def padding_fraction(self) -> float:
        """Share of input positions that are padding."""
        real = 0
        lengths = np.minimum(self.documents.lengths, self.seq_len + 1)
        for i in range(len(self.row_starts) - 1):
            docs = self.row_docs[self.row_starts[i] : self.row_starts[i + 1]]
            real += min(int(lengths[docs].sum()), self.seq_len)
        return 1 - real / (len(self) * self.seq_len)

    def describe(self) -> str:
        lost = {"drop": "dropped", "truncate_left": "truncated from the left"}[self.overflow]
        return (
            f"{self.n_conversations:,} conversations, {self.n_tokens:,} tokens in "
            f"{len(self):,} rows of {self.seq_len} ({100 * self.padding_fraction:.2f}% "
            f"padding); {self.overflowed:,} longer than seq_len + 1 = {self.seq_len + 1} "
            f"tokens {lost} ({self.overflowed_tokens:,} tokens lost; "
            "data.sft_overflow)"
        )

    def __getitem__(self, i: int) -> dict:
        capacity = self.seq_len + 1
        tokens = np.zeros(capacity, TOKEN_DTYPE)
        mask = np.zeros(capacity, TOKEN_DTYPE)
        doc_ids = np.zeros(capacity, np.int32)
        at = 0
        if len(self.row_starts) > 1:
            for k, d in enumerate(self.row_docs[self.row_starts[i] : self.row_starts[i + 1]]):
                record = self.documents[int(d)][:, -capacity:]  # truncate_left, if longer
                n = record.shape[1]
                tokens[at : at + n], mask[at : at + n], doc_ids[at : at + n] = (
                    record[0],
                    record[1],
                    k + 1,
                )
                at += n
        return _row(tokens, doc_ids, mask)


def _first_fit(order: np.ndarray, lengths: np.ndarray, capacity: int):
    """Rows of documents (`order`, with `lengths`) as (documents in row order, row starts)."""
    free = np.zeros(0, np.int64)  # space left in each open row
    open_rows: list[list[int]] = []
    closed: list[list[int]] = []
    for d, n in zip(order.tolist(), lengths.tolist()):
        fits = np.flatnonzero(free >= n)
        if len(fits):
            j = int(fits[0])
        else:
            if len(open_rows) == OPEN_ROWS:
                full = int(np.argmin(free))
                closed.append(open_rows.pop(full))
                free = np.delete(free, full)
            open_rows.append([])
            free = np.append(free, capacity)
            j = len(open_rows) - 1
        open_rows[j].append(d)
        free[j] -= n
    rows = closed + open_rows
    starts = np.cumsum([0] + [len(r) for r in rows])
    docs = np.asarray([d for r in rows for d in r], np.int64)
    return docs, starts


def _layout(doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and positions of rows (last axis) whose tokens come from documents `doc`
    (any ids, equal within a document, 0 for padding); a row starts a segment."""
    starts = np.ones(doc.shape, bool)
    starts[..., 1:] = doc[..., 1:] != doc[..., :-1]
    segment_ids = (np.cumsum(starts, axis=-1) * (doc != 0)).astype(np.int32)
    index = np.broadcast_to(np.arange(doc.shape[-1]), doc.shape)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return segment_ids, positions.astype(np.int32)


def cut_rows(batch: dict, seq_len: int) -> dict:
    """A batch of rows cut into rows of `seq_len` tokens (which divides the row length): the
    rows PackedRows cuts at `seq_len` from the same tokens, in the same order."""
    rows, length = batch["inputs"].shape
    if seq_len == length:
        return batch
    pieces = {
        k: np.asarray(v).reshape(rows * (length // seq_len), seq_len) for k, v in batch.items()
    }
    # Segment ids already tell documents apart within a row; renumber them per piece.
    pieces["segment_ids"], pieces["positions"] = _layout(pieces["segment_ids"])
    return pieces
