"""The Transformer's parameters written out once: paths, one layer's shapes, stacking.

jaxlm.model creates them; code that must know the tree without building the model reads it
here: Hugging Face import and export (jaxlm.convert), restoring to host (jaxlm.run), FLOPs
(jaxlm.metrics) and decoding's one module per layer (`for_decoding`). A scanned model
(ModelConfig.scan_layers) stacks each block weight on a leading [layers] axis under
"layers"; an unscanned one keeps a subtree per layer, "layers_0", "layers_1", ...
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxlm.lora import LORA_INPUT_AXES, LORA_SUFFIXES

STACKED = "layers"  # the subtree of a scanned model's stacked block weights
ATTENTION = ("q", "k", "v", "o")  # the block kernels under "attn"; the rest are under "mlp"


def model_fields(model_cfg) -> dict:
    """config.model (a ConfigDict or its JSON record) as a dict with head_dim resolved
    (0 means d_model // n_heads)."""
    m = dict(model_cfg)
    m["head_dim"] = int(m["head_dim"]) or m["d_model"] // m["n_heads"]
    return m


def block_kernels(m: dict) -> dict[str, tuple]:
    """One layer's matmul kernels and their shapes, input axes first (LORA_INPUT_AXES says
    how many), for config.model fields `m` (head_dim resolved)."""
    d, h, kv, hd, ff = m["d_model"], m["n_heads"], m["n_kv_heads"], m["head_dim"], m["d_ff"]
    return {
        "q": (d, h, hd),
        "k": (d, kv, hd),
        "v": (d, kv, hd),
        "o": (h, hd, d),
        "gate": (d, ff),
        "up": (d, ff),
        "down": (ff, d),
    }


def matmul_sizes(m: dict) -> dict[str, tuple[int, int]]:
    """(fan in, fan out) of each of one layer's matmul kernels."""
    return {
        name: (
            int(np.prod(shape[: LORA_INPUT_AXES[name]])),
            int(np.prod(shape[LORA_INPUT_AXES[name] :])),
        )
        for name, shape in block_kernels(m).items()
    }


def params(m: dict) -> list[tuple[tuple, tuple, int]]:
    """(path, shape, input axes or 0 if not a matmul) of every parameter, block weights
    under STACKED with one layer's shape."""
    d, v = m["d_model"], m["vocab_size"]
    kernels = block_kernels(m)
    rows = [
        ((STACKED, "attn" if name in ATTENTION else "mlp", name), shape, LORA_INPUT_AXES[name])
        for name, shape in kernels.items()
    ]
    rows += [
        ((STACKED, "attn_norm", "scale"), (d,), 0),
        ((STACKED, "mlp_norm", "scale"), (d,), 0),
        (("embedding",), (v, d), 0),
        (("final_norm", "scale"), (d,), 0),
    ]
    if not m["tie_embeddings"]:
        rows.append((("head",), (d, v), 1))
    return rows


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def host_arrays(m: dict) -> dict:
    """Empty NumPy arrays of every parameter (stacked, in param_dtype): a restore target."""
    target: dict = {}
    for path, shape, _ in params(m):
        stacked = (m["n_layers"],) if path[0] == STACKED else ()
        set_path(target, path, np.empty(stacked + shape, m["param_dtype"]))
    return target


def host_adapters(m: dict, rank: int, targets) -> dict:
    """Empty NumPy arrays shaped as LoRA's adapters (float32, stacked) of the kernels
    `targets`: A [layers, input axes, rank] and B [layers, rank, output axes]."""
    target: dict = {}
    a, b = LORA_SUFFIXES
    for path, shape, n_in in params(m):
        if path[0] == STACKED and path[-1] in targets:
            layers = (m["n_layers"],)
            set_path(
                target,
                path[:-1] + (path[-1] + a,),
                np.empty(layers + shape[:n_in] + (rank,), np.float32),
            )
            set_path(
                target,
                path[:-1] + (path[-1] + b,),
                np.empty(layers + (rank,) + shape[n_in:], np.float32),
            )
    return target


def for_decoding(params: dict, config, free: bool = False):
    """(params, config) as decoding runs fastest: a module per layer, its weights unstacked
    from training's [layers, ...] arrays (a scanned layer's weights are sliced out of the
    stack at every step: a copy of every weight per token, on CPU). With `free`, each stacked
    array is deleted once split, so the weights are held about once, not twice."""
    if not config.scan_layers:
        return params, config
    params = dict(params)
    leaves, treedef = jax.tree.flatten(params.pop(STACKED))
    layers = [[] for _ in range(config.n_layers)]
    for leaf in leaves:
        pieces = [leaf[n] for n in range(config.n_layers)]
        for layer, piece in zip(layers, pieces):
            layer.append(piece)
        if free and isinstance(leaf, jax.Array):
            jax.block_until_ready(pieces)
            leaf.delete()
    for n, layer in enumerate(layers):
        params[f"{STACKED}_{n}"] = jax.tree.unflatten(treedef, layer)
    return params, dataclasses.replace(config, scan_layers=False)
