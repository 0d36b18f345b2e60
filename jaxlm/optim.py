"""The optimizer: one optax chain, optionally accumulating gradients over microbatches."""

from __future__ import annotations

import jax
import optax

from jaxlm import batch_schedule, mup

NO_DECAY_LEAVES = ("scale", "bias")  # RMSNorm scales (and any bias): never decayed


def schedule(t, seq_len: int = 0) -> optax.Schedule:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps; with
    train.batch_schedule, the same in tokens of rows of seq_len (jaxlm.batch_schedule)."""
    if t.batch_schedule:
        return batch_schedule.lr_schedule(t, seq_len)
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


def make_optimizer(
    t, seq_len: int = 0, hidden_lr_ratio: float = 1.0
) -> optax.GradientTransformation:
    """clip -> AdamW(schedule, decay mask) [-> the hidden matrices' updates times
    hidden_lr_ratio, muP's per-matrix learning rate]; in MultiSteps when accumulating (as many
    microbatches as the batch schedule's stage holds, with one)."""
    tx = optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(
            schedule(t, seq_len),
            b1=t.b1,
            b2=t.b2,
            eps=t.eps,
            weight_decay=t.weight_decay,
            mask=decay_mask,
        ),
    )
    if hidden_lr_ratio != 1.0:
        tx = optax.chain(tx, mup.scale_hidden_updates(hidden_lr_ratio))
    if t.batch_schedule:
        tx = optax.MultiSteps(tx, every_k_schedule=batch_schedule.accum_schedule(t, seq_len))
    elif t.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
    return tx
