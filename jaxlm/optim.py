"""The optimizer: one optax chain, optionally accumulating gradients over microbatches."""

from __future__ import annotations

import jax
import optax

from jaxlm import mup

NO_DECAY_LEAVES = ("scale", "bias")  # RMSNorm scales (and any bias): never decayed


def schedule(t) -> optax.Schedule:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.lr,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


def decay_mask(params):
    """True where weight decay applies: every weight except norm scales and biases."""

    def decays(path, _):
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return names[-1] not in NO_DECAY_LEAVES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t, hidden_lr_ratio: float = 1.0) -> optax.GradientTransformation:
    """clip -> AdamW(schedule, decay mask) [-> the hidden matrices' updates times
    hidden_lr_ratio, muP's per-matrix learning rate]; in MultiSteps when accumulating."""
    tx = optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(
            schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask
        ),
    )
    if hidden_lr_ratio != 1.0:
        tx = optax.chain(tx, mup.scale_hidden_updates(hidden_lr_ratio))
    if t.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
    return tx
