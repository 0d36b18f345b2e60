"""The maximal-update parametrization (muP) for a LLaMA block trained with Adam, in one place.

Tensor Programs V (Yang et al. 2022), the Adam column of its table of rules, with
ratio = model.mup_base_width / model.d_model (the width the hyperparameters were tuned at over
the width trained):

| weights | init std | Adam learning rate | forward |
| --- | --- | --- | --- |
| embedding | init_std | lr | as is |
| hidden matrices (q, k, v, o, gate, up, down) | init_std * sqrt(ratio) | lr * ratio | as is |
| head (untied) | init_std | lr | logits * ratio |
| attention | | | scores q.k / head_dim, not / sqrt(head_dim) |
| norm scales | 1 | lr | as is |
| LoRA A of a hidden matrix (width -> rank) | as sp (1/sqrt(fan_in)) | lr * ratio | as is |
| LoRA B (rank -> width; starts at zero) | 0 | lr | as is |

LoRA's A contracts the width into a fixed rank, as the head does, so its Adam step shrinks
with the width; B fans a fixed rank out to the width, as the embedding does, so its step
does not (Tensor Programs V's output and input weights).

Under "sp" (the standard parametrization) every multiplier is 1 and nothing changes, so an sp
run computes exactly what it did before. At ratio 1 muP differs from sp only in the attention
scale. The attention scale is applied to the queries (q / sqrt(head_dim), then every kernel's
own 1 / sqrt(head_dim)), so splash, cuDNN and the ring need no change; export folds it into
the q projection and the logits multiplier into the head, so a `transformers` model computes
the same logits.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

PARAMETRIZATIONS = ("sp", "mup")
HIDDEN = ("q", "k", "v", "o", "gate", "up", "down")
# LoRA's A of a hidden matrix (jaxlm.lora names it `q_lora_a`, ...): its learning rate too
WIDTH_CONTRACTING = HIDDEN + tuple(name + "_lora_a" for name in HIDDEN)


def width_ratio(parametrization: str, base_width: int, d_model: int) -> float:
    """base_width / d_model under muP (base 0: d_model itself), 1 under sp."""
    if parametrization != "mup":
        return 1.0
    return (base_width or d_model) / d_model


def ratio_of(cfg) -> float:
    """width_ratio of a ModelConfig (or any object with its fields)."""
    return width_ratio(cfg.parametrization, cfg.mup_base_width, cfg.d_model)


def init_scale(cfg) -> float:
    """The hidden matrices' init std multiplier: their variance goes with 1 / width."""
    return float(np.sqrt(ratio_of(cfg)))


def scale_queries(q, cfg):
    """The queries times 1 / sqrt(head_dim) under muP (scores / head_dim); as they are under sp."""
    if cfg.parametrization != "mup":
        return q
    return q * np.asarray(float(cfg.head_dim) ** -0.5, q.dtype)


def scale_logits(x, cfg):
    """The final hidden state times the width ratio under muP (logits * ratio); as is under sp."""
    if cfg.parametrization != "mup":
        return x
    return x * np.asarray(ratio_of(cfg), x.dtype)


def lr_multipliers(params, ratio: float):
    """A tree like `params`: `ratio` for the hidden matrices and LoRA's A of them, 1 for
    every other leaf."""

    def multiplier(path, _):
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return ratio if names and names[-1] in WIDTH_CONTRACTING else 1.0

    return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_hidden_updates(ratio: float) -> optax.GradientTransformation:
    """Multiply the hidden matrices' updates (Adam's step and its decoupled weight decay,
    both proportional to the learning rate) by `ratio`: their learning rate times ratio."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scaled = jax.tree.map(lambda u, m: u * m, updates, lr_multipliers(updates, ratio))
        return scaled, state

    return optax.GradientTransformation(init, update)


def fold_for_export(params: dict, m: dict) -> dict:
    """Host params of a muP run with the forward's multipliers folded into the weights (the
    q projection times 1 / sqrt(head_dim), the head times the width ratio), for a model
    that has none (Hugging Face Llama). `m`: config.model fields, head_dim resolved."""
    if m.get("parametrization", "sp") != "mup":
        return params
    folded = dict(params)
    layers = dict(folded["layers"])
    attn = dict(layers["attn"])
    attn["q"] = attn["q"] * np.asarray(float(m["head_dim"]) ** -0.5, attn["q"].dtype)
    layers["attn"] = attn
    folded["layers"] = layers
    ratio = width_ratio("mup", m.get("mup_base_width", 0), m["d_model"])
    folded["head"] = folded["head"] * np.asarray(ratio, folded["head"].dtype)
    return folded
