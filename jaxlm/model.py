"""A LLaMA-style decoder-only Transformer in Flax linen, read top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> SwiGLU MLP, pre-norm residual
blocks scanned over layers. Every parameter and the main activations carry logical axis
names (see docs/DESIGN.md); the model knows nothing about meshes. Logits come out in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import attention, lora, mup
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
    # update (lora_alpha / lora_rank) * x A B beside it (jaxlm.lora.low_rank_term).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ()
    # "sp" or "mup" (jaxlm.mup: init, learning rate, logits and attention scale by width)
    parametrization: str = "sp"
    mup_base_width: int = 0  # muP: the d_model the hyperparameters were tuned at (0: d_model)


def _param(module: nn.Module, name: str, shape: tuple, names: tuple, std: float | None = None):
    """A normal(std, default cfg.init_std) parameter tagged with logical axis names."""
    std = module.cfg.init_std if std is None else std
    init = nn.with_logical_partitioning(nn.initializers.normal(std), names)
    return module.param(name, init, shape, module.cfg.param_dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
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
    short, long = wavelength < context / high, wavelength > context / low
    return jnp.where(short, inv_freq, jnp.where(long, inv_freq / factor, between))


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
    NaN, which the train step's non-finite guard catches): inline, XLA's CPU backend repeats
    them for every head; on TPU the gather costs more (`table=False`). Both compute the same
    float32 angles. The rotation multiplies in x's dtype, by sin and cos rounded to it, as
    `transformers` and MaxText do: faster on TPU than float32 (benchmarks/results/NOTES.md).
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


def _project(module: nn.Module, name: str, spec: str, x, shape, names, into_residual=False):
    """einsum(spec, x, kernel `name`), plus its LoRA term where `name` is a LoRA target. A
    kernel writing into the residual stream starts smaller the deeper the model (GPT-2)."""
    c = module.cfg
    std = c.init_std / (2 * c.n_layers) ** 0.5 if into_residual else c.init_std
    std *= mup.init_scale(c)
    y = jnp.einsum(spec, x, _param(module, name, shape, names, std).astype(c.dtype))
    if not c.lora_rank or name not in c.lora_targets:
        return y
    return y + lora.low_rank_term(module, name, x, shape, names, c)


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
            names = ("embed", axis, "head_dim")
            y = _project(self, name, "bld,dhk->blhk", x, (d, n, hd), names)
            return nn.with_logical_constraint(y, ("batch", "length", "act_" + axis, None))

        q, k, v = heads("q", h, "heads"), heads("k", kv, "kv_heads"), heads("v", kv, "kv_heads")
        # Decoding gathers its angles from a table as long as the cache, whatever rotary_table.
        slots = None if cache is None else cache["k"].shape[3]
        table = c.rotary_table or cache is not None
        q = apply_rotary(q, positions, c.rope_theta, slots, table, c.rope_scaling)
        k = apply_rotary(k, positions, c.rope_theta, slots, table, c.rope_scaling)
        q = mup.scale_queries(q, c)  # muP: scores / head_dim, through any kernel
        if cache is None:
            out = attention.attend(q, k, v, segment_ids, c.attention)
        else:
            out, cache = self._cached(q, k, v, positions, cache, layer)
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
        names = ("heads", "head_dim", "embed")
        out = _project(self, "o", "blhk,hkd->bld", out, (h, hd, d), names, into_residual=True)
        return out if cache is None else (out, cache)

    @staticmethod
    def _cached(q, k, v, positions, cache, layer):
        """Decoding: this call's keys and values written into the cache, then attention over it."""
        rows = jnp.arange(q.shape[0])[:, None]
        # new [b, l, kv, hd] into slots `positions` of cache [layers, b, kv, slots, hd]
        cache = {
            name: nn.with_logical_constraint(
                cache[name].at[layer, rows, :, positions].set(new.astype(cache[name].dtype)),
                ("layers", "batch", "act_kv_heads", None, None),
            )
            for name, new in (("k", k), ("v", v))
        }
        return attention.cached_attention(q, cache["k"][layer], cache["v"][layer], positions), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, up_shape, up_names = self.cfg, (self.cfg.d_model, self.cfg.d_ff), ("embed", "mlp")
        gate = _project(self, "gate", "bld,df->blf", x, up_shape, up_names)
        up = _project(self, "up", "bld,df->blf", x, up_shape, up_names)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        shape, names = (c.d_ff, c.d_model), ("mlp", "embed")
        return _project(self, "down", "blf,fd->bld", h, shape, names, into_residual=True)


class Block(nn.Module):
    """Pre-norm residual block; scan-shaped: (carry, *broadcast, layer) -> (carry, None). The
    carry is x, or when decoding (x, the whole KV cache), `layer` naming this block's slice."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, segment_ids, layer=None):
        c = self.cfg
        x, cache = carry if layer is not None else (carry, None)
        norm = functools.partial(RMSNorm, c.norm_eps, c.dtype, c.param_dtype)
        h = norm(name="attn_norm")(x)
        attn = Attention(c, name="attn")(h, positions, segment_ids, cache, layer)
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
    def __call__(self, tokens, positions=None, segment_ids=None, head_inputs=False, cache=None):
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
        embedding = _param(self, "embedding", (c.vocab_size, c.d_model), ("vocab", "embed"))
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
                layer = block(c, name=f"layers_{i}")
                if cache is None:
                    x, _ = layer(x, positions, segment_ids)
                else:
                    (x, cache[i]), _ = layer((x, cache[i]), positions, segment_ids, 0)
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
        x = mup.scale_logits(x, c)  # muP: logits * base_width / width
        if shards > 1:
            x = attention.restore(x, shards)
            x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        if c.tie_embeddings:
            head = embedding.T
        else:
            head = _param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"))
        head = head.astype(c.dtype)
        if head_inputs:
            out = x, head
        else:
            logits = logits_dot(x, head)
            out = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return out if cache is None else (out, cache)
