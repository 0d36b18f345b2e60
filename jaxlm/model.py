"""A LLaMA-style decoder-only Transformer in Flax linen, read top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> SwiGLU MLP, pre-norm residual
blocks scanned over layers. Every parameter and the main activations carry logical axis
names (see DESIGN.md); the model knows nothing about meshes. Logits come out in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import attention as attention_lib
from jaxlm import context_parallel


def _fused_attention(prim, *args, **params) -> bool:
    """The fused attention kernel's forward (cuDNN): its output and softmax statistics.

    A custom call is no `dot_general`, so the dot policies drop it and the backward pass
    runs the whole attention forward again (measured on an H100: ~17 ms of a 486 ms step
    of configs/1b.py). Saving it costs batch * length * heads * (head_dim + 1) per layer.
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
        _policies.checkpoint_dots_with_no_batch_dims, _save_attention),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    # Llama-3 rope scaling (factor, low_freq_factor, high_freq_factor, original context); None: off
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32  # compute
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # "none" or a key of REMAT_POLICIES
    attention: str = "xla"  # see jaxlm.attention.attention
    # False: `xla` attention's scores and softmax in the compute dtype (MaxText's default)
    float32_attention_scores: bool = True
    splash_block_q: int = 512  # splash kernel tiles (clipped to the row length)
    splash_block_kv: int = 512
    splash_interpret: bool | None = None  # None: interpret unless the default backend is TPU
    context_parallel: str = "all_gather"  # attention over a split sequence: see context_parallel
    scan_unroll: int = 1  # layers per scan iteration (n_layers: no loop at all)
    # False: one module per layer (params layers_0 .. layers_{n-1}, unstacked), for decoding,
    # where a scanned layer's weights would be sliced out of the stack, a copy, every step.
    scan_layers: bool = True
    # The platform compiled for ("cpu", "gpu", "tpu"); None: the default backend. jaxlm.step
    # sets it from its devices, which may be a TPU slice described on a CPU host (jaxlm.aot).
    # It picks platform-tuned forms of the same arithmetic (see `on_tpu`).
    platform: str | None = None
    # LoRA: rank 0 is off; else each kernel named in lora_targets gets a trained low-rank
    # update (lora_alpha / lora_rank) * x A B beside it (see `_project`).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ()


def on_tpu(cfg: ModelConfig) -> bool:
    """Is the model compiled for TPU? There the rotary sin/cos are computed inline rather than
    gathered from a table, causal XLA attention runs in 8 query blocks rather than 4, and the
    loss picks the target logit with a select rather than a gather: the same values, fewer
    bytes moved on TPU, slower on a CPU (measurements in the functions' docstrings)."""
    return (cfg.platform or jax.default_backend()) == "tpu"


def _init(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(half: int, theta: float, scaling: tuple | None = None):
    """theta^(-i/half), i < half; with Llama-3 scaling (factor, low_freq_factor,
    high_freq_factor, original_context), wavelengths longer than original_context /
    low_freq_factor are stretched by factor, shorter than original_context /
    high_freq_factor kept, and those between interpolated, as Llama 3.1 was trained."""
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if not scaling:
        return inv_freq
    factor, low, high, context = scaling
    wavelength = 2 * jnp.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return jnp.where(wavelength < context / high, inv_freq,
                     jnp.where(wavelength > context / low, inv_freq / factor, between))


def apply_rotary(x, positions, theta: float, max_position: int | None = None,
                 table: bool = True, scaling: tuple | None = None):
    """Rotate pairs (i, i + head_dim/2) of x [b, l, h, d] by position-dependent angles.

    With `table`, sin and cos are computed once per position into a [max_position, d/2] table
    and gathered by `positions`, which must lie in [0, max_position) (default: the row length,
    which holds for training rows, whose positions restart at 0 for every packed document; a
    position outside it gives NaN, which the train step's non-finite guard catches). Computed
    inline, XLA's CPU backend fuses and repeats them for every head and every use of each
    element: 20 of the 23 ms a [8, 512, 8, 64] rotation forward and backward took on a 2-core
    CPU. On TPU the gather costs more than the inline sin/cos (`table=False`): the LLaMA-2-7B
    q and k rotations of 8 x 4096 tokens per v5p chip, forward, remat forward and backward,
    compiled by libtpu: 14.0 GB moved with the table, 13.3 GB inline, est. 5.97 vs 5.65 ms
    (benchmarks/results/NOTES.md). Both compute the same float32 angles position * inv_freq.

    The rotation itself multiplies in x's dtype, by sin and cos rounded to it, as
    `transformers` and MaxText do. In float32 it changes nothing; in bfloat16 a float32
    rotation made XLA write the q and k projections out in float32 and convert them back in
    the backward: the 7B step on v5p-64 (libtpu's estimate, splash) took 4.442 s, 4.378 s in
    bfloat16 (benchmarks/results/NOTES.md, session 11).
    """
    half = x.shape[-1] // 2
    inv_freq = rope_frequencies(half, theta, scaling)
    if table:
        angle = jnp.arange(max_position or x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
        sin = jnp.take(jnp.sin(angle), positions, axis=0)[:, :, None, :]  # [b, l, 1, d/2]
        cos = jnp.take(jnp.cos(angle), positions, axis=0)[:, :, None, :]
    else:
        angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, d/2]
        sin, cos = jnp.sin(angle), jnp.cos(angle)
    sin, cos = sin.astype(x.dtype), cos.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _weight(module: nn.Module, name: str, shape: tuple, names: tuple, std: float, c):
    """A normal(std)-initialised parameter tagged with logical axis names, cast for compute."""
    w = module.param(name, _init(std, names), shape, c.param_dtype)
    return w.astype(c.dtype)


# The kernels LoRA can adapt, and how many leading axes of each the input is contracted with.
LORA_INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
LORA_SUFFIXES = ("_lora_a", "_lora_b")


def _project(module: nn.Module, name: str, spec: str, x, shape: tuple, names: tuple,
             std: float):
    """einsum(spec, x, kernel `name`), plus, where `name` is a LoRA target, its low-rank
    update (alpha / rank) * (x A) B.

    A [the kernel's input axes, rank] starts random (PEFT's kaiming-uniform bound
    1/sqrt(fan_in)) and B [rank, its output axes] at zero, so training starts from the base
    model exactly. Both are float32 whatever the base's dtype; the rank axis is replicated.
    """
    c = module.cfg
    y = jnp.einsum(spec, x, _weight(module, name, shape, names, std, c))
    if not c.lora_rank or name not in c.lora_targets:
        return y
    n_in = LORA_INPUT_AXES[name]
    fan_in_uniform = nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
    a = module.param(name + "_lora_a", nn.with_logical_partitioning(
        fan_in_uniform, names[:n_in] + ("lora_rank",)), shape[:n_in] + (c.lora_rank,),
        jnp.float32)
    b = module.param(name + "_lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, ("lora_rank",) + names[n_in:]), (c.lora_rank,) + shape[n_in:],
        jnp.float32)
    low = jnp.tensordot(x, a.astype(c.dtype), axes=n_in)  # [b, l, rank]
    low = nn.with_logical_constraint(low, ("batch", "length", None))
    return y + (c.lora_alpha / c.lora_rank) * jnp.tensordot(low, b.astype(c.dtype), axes=1)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None, layer=None):
        """The attention output; with a `cache` {"k", "v"} [layers, b, kv, slots, hd]
        (decoding, see jaxlm.generate) also the cache with this call's keys and values
        written into `layer` at the slots their positions name."""
        c = self.cfg
        d, h, kv, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        out_std = c.init_std / (2 * c.n_layers) ** 0.5
        q = nn.with_logical_constraint(
            _project(self, "q", "bld,dhk->blhk", x, (d, h, hd), ("embed", "heads", "head_dim"),
                     c.init_std), ("batch", "length", "act_heads", None))
        k = nn.with_logical_constraint(
            _project(self, "k", "bld,dhk->blhk", x, (d, kv, hd),
                     ("embed", "kv_heads", "head_dim"), c.init_std),
            ("batch", "length", "act_kv_heads", None))
        v = nn.with_logical_constraint(
            _project(self, "v", "bld,dhk->blhk", x, (d, kv, hd),
                     ("embed", "kv_heads", "head_dim"), c.init_std),
            ("batch", "length", "act_kv_heads", None))
        wo = functools.partial(_project, self, "o", "blhk,hkd->bld", shape=(h, hd, d),
                               names=("heads", "head_dim", "embed"), std=out_std)
        if cache is not None:
            return self._cached(q, k, v, positions, cache, layer, wo)
        tpu = on_tpu(c)
        q = apply_rotary(q, positions, c.rope_theta, table=not tpu, scaling=c.rope_scaling)
        k = apply_rotary(k, positions, c.rope_theta, table=not tpu, scaling=c.rope_scaling)
        if context_parallel.sequence_shards() > 1:
            platform = c.platform or jax.default_backend()
            splash = attention_lib.resolve(c.attention, platform, c.dtype) == "splash"
            out = context_parallel.attention(
                q, k, v, segment_ids, c.context_parallel,
                block_impl="splash" if splash else "xla",
                splash_blocks=attention_lib.splash_block_sizes(
                    q.shape[1] // context_parallel.sequence_shards(), c.splash_block_q,
                    c.splash_block_kv) if splash else None,
                splash_interpret=(c.splash_interpret if c.splash_interpret is not None
                                  else platform != "tpu"))
        else:
            out = attention_lib.attention(
                q, k, v, segment_ids, c.attention, splash_block_q=c.splash_block_q,
                splash_block_kv=c.splash_block_kv, splash_interpret=c.splash_interpret,
                max_query_blocks=attention_lib.TPU_MAX_QUERY_BLOCKS if tpu else None,
                float32_scores=c.float32_attention_scores)
        return wo(nn.with_logical_constraint(out, ("batch", "length", "act_heads", None)))

    def _cached(self, q, k, v, positions, cache, layer, wo):
        """Decoding: rotary angles up to the cache's length, then attention over the cache."""
        slots = cache["k"].shape[3]
        q = apply_rotary(q, positions, self.cfg.rope_theta, slots, scaling=self.cfg.rope_scaling)
        k = apply_rotary(k, positions, self.cfg.rope_theta, slots, scaling=self.cfg.rope_scaling)
        rows = jnp.arange(q.shape[0])[:, None]
        # new [b, l, kv, hd] into slots `positions` of cache [layers, b, kv, slots, hd]
        cache = {name: nn.with_logical_constraint(
                     cache[name].at[layer, rows, :, positions].set(new.astype(cache[name].dtype)),
                     ("layers", "batch", "act_kv_heads", None, None))
                 for name, new in (("k", k), ("v", v))}
        out = attention_lib.cached_attention(q, cache["k"][layer], cache["v"][layer], positions)
        return wo(nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        out_std = c.init_std / (2 * c.n_layers) ** 0.5
        up_shape, up_names = (c.d_model, c.d_ff), ("embed", "mlp")
        gate = _project(self, "gate", "bld,df->blf", x, up_shape, up_names, c.init_std)
        up = _project(self, "up", "bld,df->blf", x, up_shape, up_names, c.init_std)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return _project(self, "down", "blf,fd->bld", h, (c.d_ff, c.d_model), ("mlp", "embed"),
                        out_std)


class Block(nn.Module):
    """Pre-norm residual block; scan-shaped: (carry, *broadcast, layer index) -> (carry,
    None). The carry is x, or when decoding (x, the whole KV cache) with the layer index
    naming this block's slice of it."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, segment_ids, layer=None):
        c = self.cfg
        x, cache = carry if layer is not None else (carry, None)
        norm = functools.partial(RMSNorm, c.norm_eps, c.dtype, c.param_dtype)
        attn = Attention(c, name="attn")(norm(name="attn_norm")(x), positions, segment_ids,
                                         cache, layer)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = x + MLP(c, name="mlp")(norm(name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return (x if cache is None else (x, cache)), None


@jax.custom_vjp
def logits_dot(x, head):
    """x [b, l, d] @ head [d, v] -> float32 logits, with the backward in x's dtype.

    The forward accumulates and returns float32. Plain autodiff would then carry the float32
    cotangent into both backward matmuls, running them as float32 GEMMs (measured on an H100:
    30 ms of a 504 ms step of configs/1b.py); casting the cotangent to the compute dtype
    first runs them as bf16 GEMMs, as the rest of the model's backward already does.
    """
    return jnp.einsum("bld,dv->blv", x, head, preferred_element_type=jnp.float32)


def _logits_dot_fwd(x, head):
    return logits_dot(x, head), (x, head)


def _logits_dot_bwd(residuals, grad):
    x, head = residuals
    grad = grad.astype(x.dtype)
    grad_x = jnp.einsum("blv,dv->bld", grad, head)
    grad_head = jnp.einsum("bld,blv->dv", x, grad, preferred_element_type=jnp.float32)
    return grad_x, grad_head.astype(head.dtype)


logits_dot.defvjp(_logits_dot_fwd, _logits_dot_bwd)


class Transformer(nn.Module):
    """tokens [batch, length] -> float32 logits [batch, length, vocab].

    `positions` restart at 0 for each packed document and `segment_ids` keep documents
    from attending to each other (0 marks padding); both default to one document per row.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, head_inputs: bool = False,
                 cache=None):
        """Logits, or with `head_inputs` the final hidden states [b, l, d] and the LM head
        [d, vocab] in the compute dtype, for a loss that applies the head itself (jaxlm.loss).

        With a KV `cache` {"k", "v"} [layers, b, kv_heads, slots, head_dim] (decoding, see
        jaxlm.generate; `positions` required, `segment_ids` unused; without scan_layers a list
        of one {"k", "v"} [1, b, kv_heads, slots, head_dim] per layer) it returns (that output,
        the updated cache)."""
        c = self.cfg
        if cache is not None and (positions is None or context_parallel.sequence_shards() > 1):
            raise ValueError("decoding with a cache needs positions and an unsplit sequence "
                             "(the logical axis 'length' on no mesh axis)")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # A sequence split over devices is reordered so causal attention costs every shard
        # the same (jaxlm.context_parallel); the order is restored before the head.
        shards = context_parallel.sequence_shards()
        if shards > 1:
            tokens, positions = (context_parallel.balance(a, shards) for a in (tokens, positions))
            if segment_ids is not None:
                segment_ids = context_parallel.balance(segment_ids, shards)
        embedding = self.param("embedding", _init(c.init_std, ("vocab", "embed")),
                               (c.vocab_size, c.d_model), c.param_dtype)
        x = jnp.take(embedding, tokens, axis=0).astype(c.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = Block
        if c.remat != "none":
            # With no loop between forward and backward (unrolled layers; a 1-layer scan, which
            # XLA removes) XLA would merge the recomputation with the forward and undo remat.
            unrolled = c.scan_unroll > 1 or c.n_layers == 1 or not c.scan_layers
            block = nn.remat(Block, prevent_cse=unrolled, policy=REMAT_POLICIES[c.remat])
        if not c.scan_layers:
            cache = None if cache is None else list(cache)
            for i in range(c.n_layers):
                if cache is None:
                    x, _ = block(c, name=f"layers_{i}")(x, positions, segment_ids)
                else:
                    (x, cache[i]), _ = block(c, name=f"layers_{i}")(
                        (x, cache[i]), positions, segment_ids, 0)
        else:
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast, 0), length=c.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"},
                             unroll=c.scan_unroll)(c, name="layers")
            if cache is None:
                x, _ = layers(x, positions, segment_ids, None)
            else:
                # The cache rides in the carry and each layer writes its slice in place; as a
                # scanned input and output it would be copied whole at every decode step.
                (x, cache), _ = layers((x, cache), positions, segment_ids, jnp.arange(c.n_layers))
        x = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="final_norm")(x)
        if shards > 1:
            x = nn.with_logical_constraint(context_parallel.restore(x, shards),
                                           ("batch", "length", "act_embed"))

        if c.tie_embeddings:
            head = embedding.T
        else:
            head = self.param("head", _init(c.init_std, ("embed", "vocab")),
                              (c.d_model, c.vocab_size), c.param_dtype)
        if head_inputs:
            out = x, head.astype(c.dtype)
        else:
            out = nn.with_logical_constraint(logits_dot(x, head.astype(c.dtype)),
                                             ("batch", "length", "act_vocab"))
        return out if cache is None else (out, cache)
