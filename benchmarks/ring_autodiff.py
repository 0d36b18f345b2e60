"""The ring's losing variant: its backward had by autodiff of the forward loop, each query
tile under jax.checkpoint so no scores are kept, instead of jaxlm.attention.ring's custom
VJP. Autodiff keeps every step's K/V block (and each tile's inputs) for the backward; the
custom VJP keeps only q, k, v, the output and the log-sum-exp and rotates K/V again.
Compiled for v5p-16 it needs more temporaries per chip and XLA estimates its layer slower
(benchmarks.ring_variants, results/ring-variants.md). Kept for that comparison and for the
test that both give the same gradients.
"""

from __future__ import annotations

import contextlib
from unittest import mock

from jaxlm.attention import ring, ring_xla

_custom_vjp_ring = ring.ring_attention


def autodiff_ring(q, k, v, seg, axes, shards: int, blocks):
    """`ring.ring_attention` with XLA blocks differentiated by autodiff; other blocks (the
    Pallas kernels have no autodiff) keep the custom VJP."""
    if not isinstance(blocks, ring_xla.XlaBlocks):
        return _custom_vjp_ring(q, k, v, seg, axes, shards, blocks)
    blocks = ring_xla.XlaBlocks(remat=True)
    out = ring.forward(blocks, *blocks.enter(q, k, v, seg), axes, shards)[0]
    return blocks.leave(out, q.shape)


@contextlib.contextmanager
def autodiff_backward():
    """Within it, model code traced runs the ring's XLA blocks with the autodiff backward."""
    with mock.patch.object(ring, "ring_attention", autodiff_ring):
        yield
