"""The load-balanced order of a row split over sequence shards (context parallelism).

A row of length l is cut into 2n chunks of c = l / 2n tokens for n sequence shards. Causal
attention gives late chunks more keys than early ones, so contiguous shards would leave shard 0
idle while the last computes most of the triangle. `balance` reorders every row so that shard i
holds chunks i and 2n-1-i: each shard then sees the same number of (query, key) pairs. The
Transformer balances its inputs once on entry and restores the order once on exit; in between,
only attention needs to know, through `original_index`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlm import mesh_axes


def sequence_shards() -> int:
    """How many ways the traced mesh (jax.set_mesh) splits the logical axis "length"."""
    return mesh_axes.logical_size("length")


def balance(x, shards: int, axis: int = 1):
    """Reorder `axis` (length l, divisible by 2 * shards) so that shard i of an even split
    holds chunks i and 2*shards-1-i of the original order."""
    x = jnp.moveaxis(x, axis, 0)
    chunks = x.reshape(2 * shards, -1, *x.shape[1:])
    pairs = jnp.stack([chunks[:shards], chunks[shards:][::-1]], axis=1)  # [n, 2, c, ...]
    return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def restore(x, shards: int, axis: int = 1):
    """The inverse of `balance`."""
    x = jnp.moveaxis(x, axis, 0)
    pairs = x.reshape(shards, 2, -1, *x.shape[1:])
    chunks = jnp.concatenate([pairs[:, 0], pairs[:, 1][::-1]], axis=0)
    return jnp.moveaxis(chunks.reshape(x.shape), 0, axis)


def original_index(length: int, shards: int) -> np.ndarray:
    """Position in the original row of each position of the balanced row (host constant)."""
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.stack([chunks[:shards], chunks[shards:][::-1]], axis=1).reshape(-1)
