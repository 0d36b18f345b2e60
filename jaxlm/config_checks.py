"""Checks of one part of a config at a time, and of the config against the mesh.

`jaxlm.config.validate` calls them in order; each raises `ConfigError` naming the field, the
value and what would be valid.
"""

from __future__ import annotations

import importlib.util
import math

from jaxlm import lora as lora_lib
from jaxlm.errors import ConfigError
from jaxlm.mesh_axes import MESH_AXES


def require(ok: bool, field: str, value, valid: str):
    """Raise ConfigError for config.`field`=`value` unless `ok`; `valid` says what would be."""
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is invalid: {valid}")


def check_mup(m) -> None:
    """model.parametrization and mup_base_width."""
    require(
        m.parametrization in ("sp", "mup"), "model.parametrization", m.parametrization,
        "'sp' or 'mup'",
    )  # fmt: skip
    require(
        m.mup_base_width >= 0, "model.mup_base_width", m.mup_base_width,
        "0 (model.d_model) or the positive width the hyperparameters were tuned at",
    )  # fmt: skip
    require(
        m.parametrization != "mup" or not m.tie_embeddings, "model.tie_embeddings",
        m.tie_embeddings, "False under model.parametrization='mup' (its head has rules of its own)",
    )  # fmt: skip


def resolve_mesh_shape(mesh_cfg, n_devices: int) -> dict:
    """Axis name -> size from config.mesh, its one -1 given the rest of the devices; the
    mesh must use every device present."""
    shape = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [a for a, s in shape.items() if s == -1]
    require(
        len(free) <= 1,
        f"mesh.{free[-1] if free else 'fsdp'}",
        -1,
        f"at most one mesh axis may be -1 (the rest of the devices); got -1 for {free}",
    )
    for axis, size in shape.items():
        require(size == -1 or size >= 1, f"mesh.{axis}", size, "a positive size or -1")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if free:
        require(
            n_devices % fixed == 0,
            f"mesh.{free[0]}",
            -1,
            f"the other axes multiply to {fixed}, which does not divide the "
            f"{n_devices} devices present",
        )
        shape[free[0]] = n_devices // fixed
    total = math.prod(shape.values())
    require(
        total <= n_devices,
        "mesh",
        dict(shape),
        f"the mesh needs {total} devices but only {n_devices} are present; "
        f"make the axes multiply to at most {n_devices}, or set one axis to -1",
    )
    require(
        total == n_devices,
        "mesh",
        dict(shape),
        f"the mesh uses {total} of the {n_devices} devices present; make the axes "
        f"multiply to {n_devices}, or set one axis to -1",
    )
    return shape


def check_mesh_fit(config, shape: dict) -> None:
    """What splitting over the mesh axes of `shape` needs of the model and data sizes."""
    m, t, d = config.model, config.train, config.data
    tensor = shape["tensor"]
    require(
        m.n_heads % tensor == 0,
        "model.n_heads",
        m.n_heads,
        f"must be divisible by mesh.tensor={tensor} (heads are split over the tensor axis)",
    )
    require(
        m.n_kv_heads % tensor == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must be divisible by mesh.tensor={tensor} (kv heads are split over the tensor axis)",
    )
    require(
        m.d_ff % tensor == 0, "model.d_ff", m.d_ff, f"must be divisible by mesh.tensor={tensor}"
    )
    require(
        m.vocab_size % tensor == 0,
        "model.vocab_size",
        m.vocab_size,
        f"must be divisible by mesh.tensor={tensor}",
    )
    require(
        m.d_model % (shape["fsdp"] * shape["sequence"]) == 0,
        "model.d_model",
        m.d_model,
        f"must be divisible by mesh.fsdp * mesh.sequence = "
        f"{shape['fsdp'] * shape['sequence']} (weights are split over both along d_model)",
    )
    require(
        d.seq_len % (2 * shape["sequence"]) == 0 or shape["sequence"] == 1,
        "data.seq_len",
        d.seq_len,
        f"must be divisible by 2 * mesh.sequence={2 * shape['sequence']} (a row is "
        "cut into two chunks per sequence shard, jaxlm.attention.balanced_order)",
    )
    require(
        (d.seq_len // t.loss_chunks) % shape["sequence"] == 0,
        "train.loss_chunks",
        t.loss_chunks,
        f"each loss slice (data.seq_len / train.loss_chunks = "
        f"{d.seq_len // t.loss_chunks} positions) must be divisible by "
        f"mesh.sequence={shape['sequence']}",
    )


def check_lora(t) -> None:
    """config.train's LoRA fields: a rank, and (when on) kernels the model can adapt."""
    require(
        int(t.lora_rank) >= 0,
        "train.lora_rank",
        t.lora_rank,
        "0 (LoRA off) or a positive rank, e.g. 8",
    )
    if not t.lora_rank:
        return
    targets = lora_lib.LORA_INPUT_AXES
    require(
        len(t.lora_targets) > 0 and all(x in targets for x in t.lora_targets),
        "train.lora_targets",
        tuple(t.lora_targets),
        f"a non-empty tuple of the kernels {tuple(targets)}",
    )
    require(
        t.lora_alpha > 0,
        "train.lora_alpha",
        t.lora_alpha,
        "a positive scale numerator (the update is lora_alpha / lora_rank * x A B)",
    )


WANDB_MODES = ("online", "offline", "disabled")


def check_observability(t) -> None:
    """config.train's profile and Weights & Biases fields (#29)."""
    steps = tuple(t.profile_steps)
    require(
        steps == () or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
        "train.profile_steps",
        steps,
        "() for none, or (first, last) with 1 <= first <= last, e.g. (10, 12)",
    )
    every = int(t.profile_every)
    require(
        every == 0 or (steps and every > steps[1] - steps[0] + 1),
        "train.profile_every",
        every,
        "0 (one window), or with train.profile_steps set a period longer than its window",
    )
    require(t.wandb_mode in WANDB_MODES, "train.wandb_mode", t.wandb_mode, f"one of {WANDB_MODES}")
    require(
        not t.wandb_project or importlib.util.find_spec("wandb") is not None,
        "train.wandb_project",
        t.wandb_project,
        "logging to Weights & Biases needs its client: pip install 'jaxlm[wandb]'",
    )


def check_rope_scaling(m) -> None:
    """config.model's rope scaling fields, as Hugging Face's rope_type "llama3" takes them."""
    require(
        m.rope_scaling in ("", "llama3"),
        "model.rope_scaling",
        m.rope_scaling,
        "'' (none) or 'llama3'",
    )
    if not m.rope_scaling:
        return
    require(
        m.rope_scaling_factor >= 1,
        "model.rope_scaling_factor",
        m.rope_scaling_factor,
        "at least 1 (how much longer than the original context)",
    )
    require(
        0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
        "model.rope_low_freq_factor",
        m.rope_low_freq_factor,
        f"positive and below model.rope_high_freq_factor={m.rope_high_freq_factor}",
    )
    require(
        int(m.rope_original_max_position) >= 1,
        "model.rope_original_max_position",
        m.rope_original_max_position,
        "a positive context length",
    )


def check_eval_tasks(t) -> None:
    """config.train's lm-eval fields: task names (or YAML directories) and a limit; whether
    lm-eval knows the tasks is checked as the run starts (jaxlm.train_eval)."""
    require(
        isinstance(t.eval_tasks, (tuple, list)) and all(isinstance(x, str) for x in t.eval_tasks),
        "train.eval_tasks",
        t.eval_tasks,
        'a tuple of lm-eval task names or task-YAML directories, e.g. ("arc_easy",)',
    )
    require(t.eval_limit >= 0, "train.eval_limit", t.eval_limit, "0 (every item) or more")
    require(
        not (t.eval_tasks and t.lora_rank),
        "train.eval_tasks",
        tuple(t.eval_tasks),
        "() with LoRA (evaluate the merged run: python -m jaxlm.eval --tasks)",
    )
