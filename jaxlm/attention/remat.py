"""Remat policies by name (`model.remat`), and how they recognise an attention kernel.

A fused kernel is no `dot_general`, so the dot policies drop it and the backward pass runs
the whole attention forward again; the `*_attention` policies keep the kernel's forward.
"""

from __future__ import annotations

import jax


def _fused_attention(prim, *args, **params) -> bool:
    """The fused attention kernel's forward (cuDNN): its output and softmax statistics.

    Without it saved the backward pass runs the whole attention forward again (measured on
    an H100, see benchmarks/results/NOTES.md). Saving it costs
    batch * length * heads * (head_dim + 1) per layer.
    """
    return "dot_product_attention" in prim.name


def _splash_forward(prim, *args, **params) -> bool:
    """The splash kernel's forward (a Pallas call): its output and log-sum-exp.

    Inside the kernel's custom VJP a `checkpoint_name` is invisible to the remat policy, so,
    as for cuDNN, the kernel is recognised by its primitive and kernel name.
    """
    if prim.name != "pallas_call":
        return False
    name = params.get("name") or getattr(params.get("name_and_src_info"), "name", "")
    return str(name).startswith("splash") and "_fwd" in str(name)


_policies = jax.checkpoint_policies
# The attention kernel's forward, whichever kernel it is: cuDNN's or splash's.
_save_attention = _policies.save_from_both_policies(_fused_attention, _splash_forward)

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block, recompute it all in the backward pass
    "save_attention": _save_attention,  # only the attention kernel's forward (splash, cuDNN)
    "save_dots": _policies.checkpoint_dots,
    "save_dots_no_batch": _policies.checkpoint_dots_with_no_batch_dims,
    "save_dots_and_attention": _policies.save_from_both_policies(
        _policies.checkpoint_dots_with_no_batch_dims, _save_attention
    ),
}
