"""The ring's Pallas block kernels (jaxlm.attention.ring_kernels) in Pallas' interpreter on CPU: one
block against float64 NumPy, and the whole ring with them against the float64 reference
(in bfloat16: tests/test_context_parallel.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_context_parallel import _context_parallel, check_against_reference

from jaxlm.attention import ring_pallas


def _reference_block(q, k, v, q_pos, k_pos, q_seg, k_seg, scale):
    """float64 NumPy: the block's (out, lse) as block_forward defines them."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    allowed = ((k_pos[None, :] <= q_pos[:, None])[None] & (q_seg[:, :, None] == k_seg[:, None, :]))[
        :, None
    ]
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed, np.exp(s - m), 0.0)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bhtd", p / np.where(total == 0, 1, total), v)
    with np.errstate(divide="ignore"):
        lse = m[..., 0] + np.log(total[..., 0])
    return out, lse


def test_block_forward_matches_float64_with_rows_that_see_nothing():
    """Query positions 0-7 and 48-55 against keys 16-31 in two segments: the first rows see
    no key (lse -inf, output 0), tiles with nothing allowed are skipped."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 16, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 16, 8)).astype(np.float32) for _ in range(2))
    q_pos = np.concatenate([np.arange(8), np.arange(48, 56)]).astype(np.int32)
    k_pos = np.arange(16, 32).astype(np.int32)
    q_seg = np.stack([np.repeat([1, 2], 8), np.ones(16)]).astype(np.int32)
    k_seg = np.stack([np.repeat([1, 2], 8), np.ones(16)]).astype(np.int32)
    out, lse = ring_pallas.block_forward(
        *map(jnp.asarray, (q, k, v, q_pos, k_pos, q_seg, k_seg)),
        scale=0.3,
        block_q=8,
        block_k=8,
        interpret=True,
    )
    want_out, want_lse = _reference_block(q, k, v, q_pos, k_pos, q_seg, k_seg, 0.3)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    assert not np.all(np.isfinite(want_lse)) and np.any(np.isfinite(want_lse))
    np.testing.assert_allclose(
        np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(want_lse), want_lse, 0), atol=1e-5
    )


@pytest.mark.parametrize(
    "mesh, group, rows",
    [
        (dict(sequence=2), 1, "packed"),
        (dict(sequence=4), 2, "causal"),
        (dict(sequence=2, tensor=2), 4, "packed"),
    ],
    ids=str,
)
def test_ring_with_kernel_blocks_matches_float64_reference(monkeypatch, mesh, group, rows):
    """Values, and gradients as directional derivatives of the reference, with 8 x 8 tiles
    (several per block, some skipped by the mask); block_impl "splash" runs the ring's
    blocks in these kernels."""
    monkeypatch.setattr(ring_pallas, "BLOCK_Q", 8)
    monkeypatch.setattr(ring_pallas, "BLOCK_K", 8)
    check_against_reference(
        _context_parallel("ring", mesh["sequence"], "splash"), mesh, group, rows
    )
