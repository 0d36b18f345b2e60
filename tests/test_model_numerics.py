"""The Flax model against an independent float64 NumPy implementation of the same math."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from support import assert_directional_derivatives, bfloat16_roundoff, float32_roundoff

from jaxlm import attention as attention_lib
from jaxlm import model as model_lib
from jaxlm.model import ModelConfig, Transformer

CFG = dict(
    vocab_size=97,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    rope_theta=10000.0,
    norm_eps=1e-5,
    init_std=0.2,
)


# ---- reference, written without jaxlm: float64, loops where they make the math plain ----


def ref_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def ref_llama3_frequency(freq, scaling):
    """Llama 3.1's rope scaling of one frequency (Meta's apply_scaling): wavelengths above
    context / low_freq_factor slow down by factor, those below context / high_freq_factor
    stay, and between them the frequency blends the two linearly in context / wavelength."""
    factor, low, high, context = scaling
    wavelength = 2 * np.pi / freq
    if wavelength < context / high:
        return freq
    if wavelength > context / low:
        return freq / factor
    smooth = (context / wavelength - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


def ref_rope(x, positions, theta, scaling=None):
    """x [length, heads, d]: rotate each pair (i, i + d/2) by angle pos * theta^(-2i/d)."""
    out = x.copy()
    half = x.shape[-1] // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            freq = theta ** (-2.0 * i / x.shape[-1])
            angle = pos * (ref_llama3_frequency(freq, scaling) if scaling else freq)
            z = (x[t, :, i] + 1j * x[t, :, i + half]) * np.exp(1j * angle)
            out[t, :, i], out[t, :, i + half] = z.real, z.imag
    return out


def ref_attention(q, k, v, segments):
    """q [L, H, d], k/v [L, KV, d]; query head h reads kv head h // (H / KV)."""
    length, heads, d = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T / np.sqrt(d)
        for i in range(length):
            for j in range(length):
                if j > i or segments[i] != segments[j]:
                    scores[i, j] = -np.inf
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[:, h] = weights @ v[:, h // group]
    return out


def ref_forward(params, tokens, positions, segments, cfg, tied):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embedding"][tokens]
    layers = p["layers"]
    for layer in range(cfg["n_layers"]):
        w = jax.tree.map(lambda a, layer=layer: a[layer], layers)
        h = ref_rmsnorm(x, w["attn_norm"]["scale"], cfg["norm_eps"])
        q = np.einsum("ld,dhk->lhk", h, w["attn"]["q"])
        k = np.einsum("ld,dhk->lhk", h, w["attn"]["k"])
        v = np.einsum("ld,dhk->lhk", h, w["attn"]["v"])
        q = ref_rope(q, positions, cfg["rope_theta"], cfg.get("rope_scaling"))
        k = ref_rope(k, positions, cfg["rope_theta"], cfg.get("rope_scaling"))
        x = x + np.einsum("lhk,hkd->ld", ref_attention(q, k, v, segments), w["attn"]["o"])
        h = ref_rmsnorm(x, w["mlp_norm"]["scale"], cfg["norm_eps"])
        gate = h @ w["mlp"]["gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["mlp"]["up"])) @ w["mlp"]["down"]
    x = ref_rmsnorm(x, p["final_norm"]["scale"], cfg["norm_eps"])
    return x @ (p["embedding"].T if tied else p["head"])


# ---- tests ----


def _model(tied=False, **changes):
    return Transformer(ModelConfig(**{**CFG, "tie_embeddings": tied, **changes}))


def _params(model, length=16):
    variables = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
    params = nn.unbox(variables)["params"]
    # Norm scales start at 1; perturb them so the test sees whether they are applied.
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype)
            if "scale" in jax.tree_util.keystr(path)
            else a
        ),
        params,
    )


def _packed_row(rng, lengths=(5, 6, 3), total=16):
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    pad = total - len(segments)
    tokens = rng.integers(0, CFG["vocab_size"], total)
    return tokens, np.pad(positions, (0, pad)), np.pad(segments, (0, pad))


# Llama-3 scaling with head_dim 8: wavelengths 6.3 (kept), 63 (blended), 628 and 6283 (scaled)
LLAMA3_SCALING = (4.0, 1.0, 4.0, 64)


@pytest.mark.parametrize("tied,scaling", [(False, None), (True, None), (False, LLAMA3_SCALING)])
def test_forward_matches_numpy_reference(tied, scaling):
    model = _model(tied, rope_scaling=scaling)
    params = _params(model)
    assert ("head" in params) != tied
    rng = np.random.default_rng(0)
    rows = [_packed_row(rng), _packed_row(rng, lengths=(16,))]
    tokens, positions, segments = (np.stack(parts) for parts in zip(*rows))
    logits = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)
    )
    assert logits.dtype == jnp.float32 and logits.shape == (2, 16, CFG["vocab_size"])
    for b in range(2):
        expected = ref_forward(
            params, tokens[b], positions[b], segments[b], {**CFG, "rope_scaling": scaling}, tied
        )
        real = segments[b] != 0  # padding rows attend only to padding; not compared
        # float32 round-off (support.float32_roundoff) of each layer's attention over up to 16
        # keys and then its sums over d_model, the layers' errors adding: n_layers x 16 x
        # d_model. 0.19 of it measured (AMD EPYC), 0.21 of the old atol = rtol = 1e-5; rope's
        # theta halved moves a logit 0.17 and the documents' mask off 4.7, 1e4 x the bound
        # (1.5e-5) and more.
        terms = CFG["n_layers"] * len(tokens[b]) * CFG["d_model"]
        np.testing.assert_allclose(
            np.asarray(logits[b])[real],
            expected[real],
            rtol=0,
            atol=float32_roundoff(expected[real], terms),
        )


def test_packed_documents_equal_documents_alone():
    model = _model()
    params = _params(model)
    rng = np.random.default_rng(2)
    lengths = (5, 7, 4)
    tokens, positions, segments = _packed_row(rng, lengths)
    apply = jax.jit(model.apply)
    packed = apply(
        {"params": params},
        jnp.asarray(tokens[None]),
        jnp.asarray(positions[None]),
        jnp.asarray(segments[None]),
    )[0]
    # The packed row and a document alone sum attention over different key counts (and run
    # matmuls of other row counts) in other orders: float32 round-off of the row's keys times
    # the head's sum over d_model, as in test_splash. A leak across documents is order 0.1.
    terms = len(tokens) * CFG["d_model"]
    start = 0
    for n in lengths:
        alone = apply({"params": params}, jnp.asarray(tokens[None, start : start + n]))[0]
        np.testing.assert_allclose(
            packed[start : start + n], alone, rtol=0, atol=float32_roundoff(alone, terms)
        )
        start += n


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_blocked_attention_matches_reference_values_and_derivatives(blocks):
    """Query blocks skip the masked triangle; values and gradients stay full attention's.

    Gradients are checked as directional derivatives of the float64 reference, by central
    differences, along random directions of q, k and v together.
    """
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 16, heads, 8)) for heads in (4, 2, 2))
    segments = np.stack([_packed_row(rng, (5, 7, 4))[2], _packed_row(rng, (16,))[2]])
    weights = rng.standard_normal(q.shape)

    def blocked(q, k, v):
        out = attention_lib.xla_attention(q, k, v, jnp.asarray(segments), blocks=blocks)
        return jnp.sum(out * weights), out

    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    (_, out), grads = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1, 2), has_aux=True))(*f32)
    for b in range(2):
        np.testing.assert_allclose(
            out[b], ref_attention(q[b], k[b], v[b], segments[b]), atol=1e-5, rtol=1e-5
        )

    def ref_objective(q, k, v):
        return sum(
            np.sum(ref_attention(q[b], k[b], v[b], segments[b]) * weights[b]) for b in range(2)
        )

    assert_directional_derivatives(ref_objective, (q, k, v), grads, rng, tries=3, tol=1e-4)


def test_rotary_table_matches_reference_for_any_positions():
    """Packed rows (positions restart) and, with max_position, positions past the row length."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])
    got = np.asarray(
        model_lib.apply_rotary(jnp.asarray(x), jnp.asarray(positions), 500.0, max_position=16)
    )
    for row in range(2):
        want = ref_rope(x[row].astype(np.float64), positions[row], 500.0)
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5)
    packed = np.asarray(
        model_lib.apply_rotary(jnp.asarray(x[:1]), jnp.asarray(positions[:1]), 500.0)
    )
    np.testing.assert_allclose(
        packed[0], ref_rope(x[0].astype(np.float64), positions[0], 500.0), rtol=1e-5, atol=1e-5
    )
    scaled = np.asarray(
        model_lib.apply_rotary(
            jnp.asarray(x), jnp.asarray(positions), 500.0, max_position=16, scaling=LLAMA3_SCALING
        )
    )
    for row in range(2):
        want = ref_rope(x[row].astype(np.float64), positions[row], 500.0, LLAMA3_SCALING)
        np.testing.assert_allclose(scaled[row], want, rtol=1e-5, atol=1e-5)
    assert np.abs(scaled - got).max() > 1e-2  # the scaling changed the rotation


def test_inline_rotary_matches_the_table():
    """apply_rotary(table=False), the form compiled for TPU, computes the same angles."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    table = model_lib.apply_rotary(jnp.asarray(x), jnp.asarray(positions), 500.0)
    inline = model_lib.apply_rotary(jnp.asarray(x), jnp.asarray(positions), 500.0, table=False)
    np.testing.assert_allclose(np.asarray(inline), np.asarray(table), rtol=1e-6, atol=1e-6)
    for row in range(2):
        want = ref_rope(x[row].astype(np.float64), positions[row], 500.0)
        np.testing.assert_allclose(np.asarray(inline)[row], want, rtol=1e-5, atol=1e-5)


def test_tpu_query_blocks_match_the_reference():
    """The 8 causal query blocks XLA attention uses on TPU give the same attention."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 16, 2, 4)).astype(np.float32) for _ in range(3))
    segments = np.array([[1] * 5 + [2] * 11])
    assert attention_lib.query_blocks(4096, max_blocks=attention_lib.TPU_MAX_QUERY_BLOCKS) == 8
    want = ref_attention(*(a[0].astype(np.float64) for a in (q, k, v)), segments[0])
    args = [jnp.asarray(a) for a in (q, k, v, segments)]
    got = attention_lib.xla_attention(*args, blocks=attention_lib.TPU_MAX_QUERY_BLOCKS)
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-5, atol=1e-5)
    got = attention_lib.attend(*args, attention_lib.Settings(platform="tpu"))  # 16 tokens: 1 block
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-5, atol=1e-5)


def test_bfloat16_scores_stay_within_bfloat16_of_the_reference():
    """float32_scores=False (scores and softmax in q's dtype, MaxText's default): still the
    reference attention to bfloat16 precision, and not the float32-scores computation."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 64, heads, 16)) for heads in (4, 2, 2))
    segments = np.stack([_packed_row(rng, (20, 30, 10), 64)[2], _packed_row(rng, (64,), 64)[2]])
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    low = attention_lib.xla_attention(*bf16, jnp.asarray(segments), float32_scores=False)
    high = attention_lib.xla_attention(*bf16, jnp.asarray(segments))
    assert low.dtype == jnp.bfloat16
    for b in range(2):
        want = ref_attention(q[b], k[b], v[b], segments[b])
        np.testing.assert_allclose(np.asarray(low[b], np.float32), want, atol=0.08)
    assert np.abs(np.asarray(low, np.float32) - np.asarray(high, np.float32)).max() > 0


def test_attention_blocks_must_divide_the_sequence():
    q = jnp.zeros((1, 12, 2, 4))
    with pytest.raises(ValueError, match="does not split into 5 query blocks"):
        attention_lib.xla_attention(q, q, q, None, blocks=5)
    assert attention_lib.query_blocks(512) == 4 and attention_lib.query_blocks(16) == 1


@pytest.mark.parametrize(
    "changes",
    [
        dict(remat="full"),
        dict(remat="save_dots"),
        dict(remat="save_dots_no_batch"),
        dict(remat="save_dots_and_attention"),
        dict(scan_unroll=2),
        dict(remat="full", scan_unroll=2),
    ],
    ids=str,
)
def test_remat_and_unrolling_change_nothing_but_speed_and_memory(changes):
    plain, rematted = _model(), _model(**changes)
    params = _params(plain)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG["vocab_size"], (2, 16)))
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, CFG["vocab_size"])))

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, tokens) * weights)

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(rematted, p)))(params)
    # Unrolling changes XLA's fusions and so the float32 summation order; a wrong recompute
    # differs by order 1. Bounds from float32 round-off (support.float32_roundoff): each
    # logit as in test_splash (16 keys, then d_model), and the loss sums the weighted logits.
    logit_terms = tokens.shape[1] * CFG["d_model"]
    products = np.asarray(jax.jit(plain.apply)({"params": params}, tokens) * weights)
    value_bound = float32_roundoff(products, products.size * logit_terms)
    np.testing.assert_allclose(value, value_r, rtol=0, atol=value_bound)
    # A weight's gradient: each token's cotangent sums over the vocabulary, then the tokens add.
    grad_terms = tokens.size * CFG["vocab_size"]
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(a, b, rtol=0, atol=float32_roundoff(b, grad_terms))


def test_save_dots_and_attention_keeps_the_fused_attention_kernel():
    """On GPU the cuDNN forward (a custom call, traced as this primitive) is saved, not rerun."""
    policy = attention_lib.REMAT_POLICIES["save_dots_and_attention"]
    cudnn_forward = types.SimpleNamespace(name="dot_product_attention_fwd_wrapper")
    assert policy(cudnn_forward)
    assert not policy(jax.lax.exp_p, jax.ShapeDtypeStruct((4,), jnp.float32))


def test_parameters_carry_logical_axis_names():
    variables = _model().init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["embedding"] == P("vocab", "embed")
    assert specs["head"] == P("embed", "vocab")
    assert specs["layers"]["attn"]["q"] == P("layers", "embed", "heads", "head_dim")
    assert specs["layers"]["attn"]["k"] == P("layers", "embed", "kv_heads", "head_dim")
    assert specs["layers"]["attn"]["o"] == P("layers", "heads", "head_dim", "embed")
    assert specs["layers"]["mlp"]["down"] == P("layers", "mlp", "embed")
    assert specs["layers"]["mlp_norm"]["scale"] == P("layers", "norm")


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = _model(dtype=jnp.bfloat16)
    params = _params(model)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, CFG["vocab_size"], (1, 16)))
    logits = jax.jit(model.apply)({"params": params}, tokens)
    reference = jax.jit(_model().apply)({"params": params}, tokens)
    assert logits.dtype == jnp.float32
    # bf16 has ~3 significant digits; the answer is close to float32, not identical.
    error = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
    assert 0 < error < 0.05


def test_logits_dot_gradients():
    """The custom backward of the LM head equals plain autodiff (f32) and is close in bf16."""
    from jaxlm.model import logits_dot

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((16, 11)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 5, 11)), jnp.float32)

    def plain(x, w):
        return jnp.sum(jnp.einsum("bld,dv->blv", x, w) * weights)

    def custom(x, w):
        return jnp.sum(logits_dot(x, w) * weights)

    expected = jax.grad(plain, argnums=(0, 1))(x, head)
    for got, want in zip(jax.grad(custom, argnums=(0, 1))(x, head), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    low = jax.grad(custom, argnums=(0, 1))(x.astype(jnp.bfloat16), head.astype(jnp.bfloat16))
    # bfloat16 round-off (support.bfloat16_roundoff) of each gradient's sum of products of
    # bfloat16 inputs: over the 11-word vocabulary for x, over the 10 tokens for head. 0.14 and
    # 0.19 of it measured (AMD EPYC), 0.27 of the old rtol = atol = 0.05; a wrong backward is
    # off by order max|want| (12 and 8), 40x the bounds (0.3 and 0.2).
    for got, want, n in zip(low, expected, (head.shape[1], x.shape[0] * x.shape[1])):
        assert got.dtype == jnp.bfloat16
        bound = bfloat16_roundoff(want, n)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=bound)
