"""LoRA's adapters apart from the frozen base weights, and merged back into them.

The model (jaxlm.model, `_project`) keeps each adapter beside its kernel in the params tree:
`q` has `q_lora_a` [layers, d_model, rank] and `q_lora_b` [layers, rank, heads, head_dim].
Training differentiates the adapters only and checkpoints only them, with a reference to
the base checkpoint that resuming reads again (jaxlm.step builds and steps that state,
jaxlm.run restores it); `merge` folds them into plain weights (jaxlm.convert --merge_lora).
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from jaxlm.model import LORA_INPUT_AXES, LORA_SUFFIXES

TARGETS = tuple(LORA_INPUT_AXES)


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
