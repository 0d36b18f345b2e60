"""LoRA's adapters apart from the frozen base weights, and merged back into them.

The model (jaxlm.model, `_project`) keeps each adapter beside its kernel in the params tree:
`q` has `q_lora_a` [layers, d_model, rank] and `q_lora_b` [layers, rank, heads, head_dim].
Training differentiates the adapters only and checkpoints only them, with a reference to
the base checkpoint that resuming reads again (jaxlm.step, jaxlm.train); `merge` folds them
into plain weights (jaxlm.convert --merge_lora).
"""

from __future__ import annotations

import pathlib

import numpy as np
from flax import traverse_util

from jaxlm import checkpoint as checkpoint_lib
from jaxlm.errors import ConfigError
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


def settings(train_fields) -> tuple:
    """(lora_rank, lora_alpha, sorted lora_targets), or (0,) when LoRA is off."""
    rank = int(train_fields.get("lora_rank", 0))
    if not rank:
        return (0,)
    return rank, float(train_fields["lora_alpha"]), tuple(sorted(train_fields["lora_targets"]))


def check_same_settings(train_fields, checkpoints) -> None:
    """A LoRA checkpoint holds adapters only, a plain one no adapters: resuming one with the
    other's settings is a config mistake, not an unreadable checkpoint to set aside."""
    latest = checkpoints.latest_step()
    if latest is None:
        return
    try:
        saved = checkpoint_lib.read_meta(checkpoints.manager, latest)["config"]["train"]
    except Exception:  # an unreadable checkpoint: restore_latest_readable reports it
        return
    ours, theirs = settings(train_fields), settings(saved)
    if ours != theirs:
        raise ConfigError(
            f"config.train.lora_rank, lora_alpha, lora_targets = {ours} but the checkpoints in "
            f"{checkpoints.directory} were trained with {theirs}; resume with the same LoRA "
            "settings, or start in another --workdir")


def restore_base(base: dict, abstract_base, step: int):
    """The frozen base params (abstract_base: their shapes and shardings) that the adapters of
    LoRA checkpoint `step` were trained beside; `base` is its reference {"path", "step"}."""
    path = pathlib.Path(base["path"]) / str(base["step"])
    try:
        return checkpoint_lib.restore_params(path, abstract_base)[0]
    except Exception as e:
        raise checkpoint_lib.CheckpointError(
            f"LoRA checkpoint {step} holds only adapters, trained beside the base model "
            f"{path}, which cannot be read ({type(e).__name__}: {e}); put that checkpoint back "
            "where it was to resume") from e
