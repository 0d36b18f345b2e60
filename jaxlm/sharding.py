"""The device mesh, the logical-axis rules table, and getting batches onto the mesh.

Logical names (docs/DESIGN.md) map to mesh axes in exactly one table, `DEFAULT_RULES`;
`config.mesh.rules` replaces entries of it by name.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding

from jaxlm.mesh_axes import MESH_AXES, axes_size  # noqa: F401  (re-exported)
from jaxlm.mesh_axes import spec_axes as mesh_axes  # noqa: F401  (re-exported)

DEFAULT_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # weights: sharded over every device of a replica that does not split them by heads,
    # the sequence shards too (they hold different tokens, not different weights)
    ("embed", ("fsdp", "sequence")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters: split as their kernel's other axis, rank whole
)

BATCH_AXES = ("batch", "length")


def axis_rules(overrides=()) -> tuple:
    """DEFAULT_RULES with entries replaced (or added) by the (name, axes) pairs given."""
    overrides = {
        name: (tuple(axes) if isinstance(axes, list) else axes) for name, axes in overrides
    }
    rules = [(name, overrides.pop(name, axes)) for name, axes in DEFAULT_RULES]
    return tuple(rules + list(overrides.items()))


def make_mesh(shape: dict, devices=None) -> jax.sharding.Mesh:
    """A mesh over MESH_AXES with the sizes in `shape` (already resolved, no -1).

    Devices of several TPU slices (multi-slice, joined over the slower data-center network)
    get a hybrid mesh: the `data` axis spans the slices, every other axis stays inside one.
    """
    sizes = tuple(shape[a] for a in MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    if shape["data"] % slices:
        raise ValueError(
            f"config.mesh.data={shape['data']} is invalid: the devices span "
            f"{slices} slices and the data axis is the one that crosses them; "
            f"make mesh.data a multiple of {slices}"
        )
    per_slice = tuple(s // slices if a == "data" else s for a, s in zip(MESH_AXES, sizes))
    across = tuple(slices if a == "data" else 1 for a in MESH_AXES)
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, across, devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def logical_sharding(mesh, rules, names) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def batch_sharding(mesh, rules) -> NamedSharding:
    return logical_sharding(mesh, rules, BATCH_AXES)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assemble this process's rows into global jax.Arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def maybe_initialize_distributed() -> None:
    """Join a multi-process run when the launcher says so (see launch/).

    `jax.distributed.initialize()` finds the coordinator itself on TPU VM pods and under
    SLURM; locally, launch/local.sh sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID.
    """
    if os.environ.get("JAXLM_DISTRIBUTED", "0") != "1":
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
