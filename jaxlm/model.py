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

from jaxlm import attention
from jaxlm.loss import logits_dot


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
    remat: str = "none"  # "none" or a key of jaxlm.attention.REMAT_POLICIES
    attention: attention.Settings = dataclasses.field(default_factory=attention.Settings)
    rotary_table: bool = True  # False: sin/cos inline, as on TPU (see `apply_rotary`)
    scan_unroll: int = 1  # layers per scan iteration (n_layers: no loop at all)
    # False: one module per layer (params layers_0 .. layers_{n-1}), for decoding, where a
    # scanned layer's weights would be sliced out of the stack, a copy, every step.
    scan_layers: bool = True
    # LoRA: rank 0 is off; else each kernel named in lora_targets gets a trained low-rank
    # update (lora_alpha / lora_rank) * x A B beside it (see `_project`).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ()


def _init(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(half: int, theta: float, scaling: tuple | None = None):
    """theta^(-i/half), i < half; with Llama-3 scaling (factor, low_freq_factor,
    high_freq_factor, original_context), wavelengths longer than original_context / low are
    stretched by factor, shorter than original_context / high kept, and those between
    interpolated, as Llama 3.1 was trained."""
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if not scaling:
        return inv_freq
    factor, low, high, context = scaling
    wavelength = 2 * jnp.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return jnp.where(
        wavelength < context / high,
        inv_freq,
        jnp.where(wavelength > context / low, inv_freq / factor, between),
    )


def apply_rotary(
    x,
    positions,
    theta: float,
    max_position: int | None = None,
    table: bool = True,
    scaling: tuple | None = None,
):
    """Rotate pairs (i, i + head_dim/2) of x [b, l, h, d] by position-dependent angles.

    With `table`, sin and cos are computed once per position into a [max_position, d/2] table
    and gathered by `positions` in [0, max_position) (default: the row length; outside it,
    NaN, which the train step's non-finite guard catches). Inline, XLA's CPU backend repeats
    them for every head; on TPU the gather costs more (`table=False`). Both compute the same
    float32 angles position * inv_freq (benchmarks/results/NOTES.md). The rotation multiplies
    in x's dtype, by sin and cos rounded to it, as `transformers` and MaxText do: a float32
    rotation of bfloat16 q, k measured slower on TPU (NOTES.md, session 11).
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


def _project(module: nn.Module, name: str, spec: str, x, shape: tuple, names: tuple, std: float):
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
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
    )
    a = module.param(
        name + "_lora_a",
        nn.with_logical_partitioning(fan_in_uniform, names[:n_in] + ("lora_rank",)),
        shape[:n_in] + (c.lora_rank,),
        jnp.float32,
    )
    b = module.param(
        name + "_lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + names[n_in:]),
        (c.lora_rank,) + shape[n_in:],
        jnp.float32,
    )
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

        def heads(name, n, axis):  # x -> [b, l, n, hd], n query or kv heads
            y = _project(
                self, name, "bld,dhk->blhk", x, (d, n, hd), ("embed", axis, "head_dim"), c.init_std
            )
            return nn.with_logical_constraint(y, ("batch", "length", "act_" + axis, None))

        q, k, v = heads("q", h, "heads"), heads("k", kv, "kv_heads"), heads("v", kv, "kv_heads")
        wo = functools.partial(
            _project,
            self,
            "o",
            "blhk,hkd->bld",
            shape=(h, hd, d),
            names=("heads", "head_dim", "embed"),
            std=c.init_std / (2 * c.n_layers) ** 0.5,
        )
        if cache is not None:
            return self._cached(q, k, v, positions, cache, layer, wo)
        q, k = (
            apply_rotary(a, positions, c.rope_theta, table=c.rotary_table, scaling=c.rope_scaling)
            for a in (q, k)
        )
        out = attention.attend(q, k, v, segment_ids, c.attention)
        return wo(nn.with_logical_constraint(out, ("batch", "length", "act_heads", None)))

    def _cached(self, q, k, v, positions, cache, layer, wo):
        """Decoding: rotary angles up to the cache's length, then attention over the cache."""
        c, slots = self.cfg, cache["k"].shape[3]
        q, k = (
            apply_rotary(a, positions, c.rope_theta, slots, scaling=c.rope_scaling) for a in (q, k)
        )
        rows = jnp.arange(q.shape[0])[:, None]
        # new [b, l, kv, hd] into slots `positions` of cache [layers, b, kv, slots, hd]
        cache = {
            name: nn.with_logical_constraint(
                cache[name].at[layer, rows, :, positions].set(new.astype(cache[name].dtype)),
                ("layers", "batch", "act_kv_heads", None, None),
            )
            for name, new in (("k", k), ("v", v))
        }
        out = attention.cached_attention(q, cache["k"][layer], cache["v"][layer], positions)
        return wo(nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, up_shape, up_names = self.cfg, (self.cfg.d_model, self.cfg.d_ff), ("embed", "mlp")
        gate = _project(self, "gate", "bld,df->blf", x, up_shape, up_names, c.init_std)
        up = _project(self, "up", "bld,df->blf", x, up_shape, up_names, c.init_std)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return _project(
            self,
            "down",
            "blf,fd->bld",
            h,
            (c.d_ff, c.d_model),
            ("mlp", "embed"),
            c.init_std / (2 * c.n_layers) ** 0.5,
        )


class Block(nn.Module):
    """Pre-norm residual block; scan-shaped: (carry, *broadcast, layer) -> (carry, None). The
    carry is x, or when decoding (x, the whole KV cache), `layer` naming this block's slice."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, segment_ids, layer=None):
        c = self.cfg
        x, cache = carry if layer is not None else (carry, None)
        norm = functools.partial(RMSNorm, c.norm_eps, c.dtype, c.param_dtype)
        attn = Attention(c, name="attn")(
            norm(name="attn_norm")(x), positions, segment_ids, cache, layer
        )
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = x + MLP(c, name="mlp")(norm(name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return (x if cache is None else (x, cache)), None


class Transformer(nn.Module):
    """tokens [batch, length] -> float32 logits [batch, length, vocab].

    `positions` restart at 0 for each packed document and `segment_ids` keep documents
    from attending to each other (0 marks padding); both default to one document per row.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self, tokens, positions=None, segment_ids=None, head_inputs: bool = False, cache=None
    ):
        """Logits, or with `head_inputs` the final hidden states [b, l, d] and the LM head
        [d, vocab] in the compute dtype, for a loss that applies the head itself (jaxlm.loss).
        With a KV `cache` {"k", "v"} [layers, b, kv_heads, slots, head_dim] (decoding, see
        jaxlm.generate; `positions` required; without scan_layers a list of one per layer,
        [1, b, ...]) it returns (that output, the updated cache)."""
        c = self.cfg
        shards = attention.sequence_shards()
        if cache is not None and (positions is None or shards > 1):
            raise ValueError(
                "decoding with a cache needs positions and an unsplit sequence "
                "(the logical axis 'length' on no mesh axis)"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # A sequence split over devices is reordered so causal attention costs every shard
        # the same (jaxlm.attention.balanced_order); the order is restored before the head.
        if shards > 1:
            tokens, positions, segment_ids = (
                None if a is None else attention.balance(a, shards)
                for a in (tokens, positions, segment_ids)
            )
        embedding = self.param(
            "embedding",
            _init(c.init_std, ("vocab", "embed")),
            (c.vocab_size, c.d_model),
            c.param_dtype,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(c.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = Block
        if c.remat != "none":
            # With no loop between forward and backward (unrolled layers; a 1-layer scan, which
            # XLA removes) XLA would merge the recomputation with the forward and undo remat.
            unrolled = c.scan_unroll > 1 or c.n_layers == 1 or not c.scan_layers
            block = nn.remat(Block, prevent_cse=unrolled, policy=attention.REMAT_POLICIES[c.remat])
        if not c.scan_layers:
            cache = None if cache is None else list(cache)
            for i in range(c.n_layers):
                if cache is None:
                    x, _ = block(c, name=f"layers_{i}")(x, positions, segment_ids)
                else:
                    (x, cache[i]), _ = block(c, name=f"layers_{i}")(
                        (x, cache[i]), positions, segment_ids, 0
                    )
        else:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
                unroll=c.scan_unroll,
            )(c, name="layers")
            if cache is None:
                x, _ = layers(x, positions, segment_ids, None)
            else:
                # The cache rides in the carry and each layer writes its slice in place; as a
                # scanned input and output it would be copied whole at every decode step.
                (x, cache), _ = layers((x, cache), positions, segment_ids, jnp.arange(c.n_layers))
        x = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="final_norm")(x)
        if shards > 1:
            x = nn.with_logical_constraint(
                attention.restore(x, shards), ("batch", "length", "act_embed")
            )

        head = (
            embedding.T
            if c.tie_embeddings
            else self.param(
                "head",
                _init(c.init_std, ("embed", "vocab")),
                (c.d_model, c.vocab_size),
                c.param_dtype,
            )
        )
        if head_inputs:
            out = x, head.astype(c.dtype)
        else:
            out = nn.with_logical_constraint(
                logits_dot(x, head.astype(c.dtype)), ("batch", "length", "act_vocab")
            )
        return out if cache is None else (out, cache)
