"""Random token batches for timing train steps: the step's cost does not depend on the text."""

from __future__ import annotations

import numpy as np


def token_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """One document per row: inputs, next-token targets, every target counted."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, seq_len + 1), np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), bool),
    }
