"""Random-access tokenized documents: the one interface packing needs.

Packing cuts rows out of documents laid end to end, so it needs each document's length
up front (to find which documents a row spans without reading the others) and reads of
single documents by index. Both sources here give exactly that.

An SFT document (jaxlm.data.sft) is a [2, n] array, its tokens and its loss mask, so the mask
travels with the tokens through every source; `masked` says which kind a source holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

TOKEN_DTYPE = np.int32


class Documents(Protocol):
    lengths: np.ndarray  # tokens in each document, int64
    masked: bool  # documents are [2, n]: tokens and loss mask

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class InMemoryDocuments:
    """Token arrays held in memory (the built-in corpus, tests)."""

    def __init__(self, documents: Sequence[np.ndarray]):
        self._documents = [np.asarray(d, TOKEN_DTYPE) for d in documents]
        self.masked = bool(self._documents) and self._documents[0].ndim == 2
        self.lengths = np.array([d.shape[-1] for d in self._documents], np.int64)

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._documents[index]


class ArrayRecordDocuments:
    """Documents stored one per record (raw int32 token bytes; tokens then mask if masked)
    across ArrayRecord shards."""

    def __init__(self, paths: Sequence[str], lengths: np.ndarray, masked: bool = False):
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        self.lengths = np.asarray(lengths, np.int64)
        self.masked = masked
        if len(self._source) != len(self.lengths):
            raise ValueError(
                f"{len(self._source)} records in {len(paths)} shards but "
                f"{len(self.lengths)} lengths; the prepared dataset is inconsistent, "
                "prepare it again"
            )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        tokens = np.frombuffer(self._source[int(index)], TOKEN_DTYPE)
        return tokens.reshape(2, -1) if self.masked else tokens
