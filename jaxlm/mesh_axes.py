"""Mesh axis names, and how a `shard_map` kernel finds its axes in the context it is traced in.

A leaf: it imports nothing from jaxlm, so kernels (attention, the vocab-parallel loss) can
read the traced mesh (`jax.set_mesh`) and the logical rules (`nn.logical_axis_rules`)
without importing `jaxlm.sharding`, which builds meshes from the config.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def spec_axes(spec_entry) -> tuple:
    """The mesh axes of one PartitionSpec entry: None, an axis name, or several."""
    if spec_entry is None:
        return ()
    return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def axes_size(mesh, spec_entry) -> int:
    """How many devices one PartitionSpec entry splits over (1 for None)."""
    return int(np.prod([mesh.shape[a] for a in spec_axes(spec_entry)]))


def logical_size(name: str) -> int:
    """How many ways the traced mesh splits the logical axis `name` (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return axes_size(mesh, nn.logical_to_mesh_axes((name,))[0])
