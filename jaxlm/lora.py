"""LoRA's arithmetic: the adapters' low-rank term, and the adapters apart from the frozen base
weights or merged back into them.

The model (jaxlm.model, `_project`) keeps each adapter beside its kernel in the params tree:
`q` has `q_lora_a` [layers, d_model, rank] and `q_lora_b` [layers, rank, heads, head_dim].
Training differentiates the adapters only and checkpoints only them, with a reference to
the base checkpoint that resuming reads again (jaxlm.step builds and steps that state,
jaxlm.run restores it); `merge` folds them into plain weights (jaxlm.convert --merge_lora).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The kernels LoRA can adapt, and how many leading axes of each the input is contracted with.
LORA_INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
LORA_SUFFIXES = ("_lora_a", "_lora_b")
TARGETS = tuple(LORA_INPUT_AXES)


def low_rank_term(module: nn.Module, name: str, x, shape: tuple, names: tuple, cfg):
    """(alpha / rank) * (x A) B, for kernel `name` (`shape`, logical axes `names`) of `module`;
    A and B are created beside it as params `name`_lora_a and `name`_lora_b; `cfg` (the model's
    ModelConfig) gives rank, alpha and the compute dtype.

    A [the kernel's input axes, rank] starts random (PEFT's kaiming-uniform bound
    1/sqrt(fan_in)) and B [rank, its output axes] at zero, so training starts from the base
    model exactly. Both are float32 whatever the base's dtype; the rank axis is replicated.
    """
    n_in, rank = LORA_INPUT_AXES[name], cfg.lora_rank
    fan_in_uniform = nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
    )
    a = module.param(
        name + LORA_SUFFIXES[0],
        nn.with_logical_partitioning(fan_in_uniform, names[:n_in] + ("lora_rank",)),
        shape[:n_in] + (rank,),
        jnp.float32,
    )
    b = module.param(
        name + LORA_SUFFIXES[1],
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + names[n_in:]),
        (rank,) + shape[n_in:],
        jnp.float32,
    )
    low = jnp.tensordot(x, a.astype(cfg.dtype), axes=n_in)  # [b, l, rank]
    low = nn.with_logical_constraint(low, ("batch", "length", None))
    return (cfg.lora_alpha / rank) * jnp.tensordot(low, b.astype(cfg.dtype), axes=1)


def is_adapter(path: tuple) -> bool:
    return path[-1].endswith(LORA_SUFFIXES)


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base): the params tree cut in two nested dicts of the same layout."""
    flat = traverse_util.flatten_dict(params)
    adapters = {p: v for p, v in flat.items() if is_adapter(p)}
    base = {p: v for p, v in flat.items() if not is_adapter(p)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def join(adapters: dict, base: dict) -> dict:
    """The params tree that `split` cut."""
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(adapters))
    return traverse_util.unflatten_dict(flat)


def merge(params: dict, rank: int, alpha: float) -> dict:
    """Host (NumPy) params with each kernel W replaced by W + (alpha / rank) A B, computed in
    float32 and cast back to W's dtype; the tree then holds no adapters. Stacked layers
    [layers, ...] are merged layer by layer."""
    flat = traverse_util.flatten_dict(params)
    merged = {p: v for p, v in flat.items() if not is_adapter(p)}
    for path, kernel in merged.items():
        a_path = path[:-1] + (path[-1] + LORA_SUFFIXES[0],)
        if a_path not in flat:
            continue
        a = np.asarray(flat[a_path], np.float32)
        b = np.asarray(flat[path[:-1] + (path[-1] + LORA_SUFFIXES[1],)], np.float32)
        layers = a.shape[0]
        delta = np.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
        updated = np.asarray(kernel, np.float32) + (alpha / rank) * delta.reshape(kernel.shape)
        merged[path] = updated.astype(kernel.dtype)
    return traverse_util.unflatten_dict(merged)
